-- pageviews patch: the headers of the row per record layout before offset $2 (retention).
delete from header where topition = $1 and offset_id < $2;
