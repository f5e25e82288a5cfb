-- pageviews patch: the stored batches from the one that holds offset $2 (the last whose
-- base offset is at or before it) up to, not including, offset $3, in order. Two seeks of
-- the primary key; the caller stops reading at its byte limit.
select base_offset, last_offset, batch
from record_batch
where topition = $1
and base_offset >= coalesce(
    (select base_offset from record_batch
     where topition = $1 and base_offset <= $2
     order by base_offset desc limit 1),
    $2)
and base_offset < $3
and last_offset >= $2
order by base_offset;
