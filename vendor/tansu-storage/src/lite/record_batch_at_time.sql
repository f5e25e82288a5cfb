-- pageviews patch: the first stored batch holding a record at or after timestamp $2 (ms),
-- for ListOffsets by timestamp; the caller finds the record inside it.
select base_offset, batch
from record_batch
where topition = $1
and max_timestamp >= $2
order by base_offset
limit 1;
