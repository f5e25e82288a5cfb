-- pageviews patch: the oldest stored batches of a partition, for retention.
select base_offset, last_offset, max_timestamp, bytes
from record_batch
where topition = $1
order by base_offset
limit $2;
