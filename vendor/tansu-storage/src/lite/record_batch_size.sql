-- pageviews patch: the bytes a partition's stored batches take, for retention.bytes.
select coalesce(sum(bytes), 0) from record_batch where topition = $1;
