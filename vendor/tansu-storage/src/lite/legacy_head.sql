-- pageviews patch: the oldest records of the row per record layout (0.6.0), for retention.
select offset_id, timestamp from record where topition = $1 order by offset_id limit $2;
