-- pageviews patch: an ordered range scan of the primary key; the caller stops reading at
-- max_bytes (see PATCHED.md)
select offset_id, attributes, timestamp, k, v, producer_id, producer_epoch
from record
where topition = $1
and offset_id >= $2
and offset_id < $3
order by offset_id;
