-- pageviews patch: the records (and their headers) of the row per record layout before
-- offset $2 (retention).
delete from record where topition = $1 and offset_id < $2;
