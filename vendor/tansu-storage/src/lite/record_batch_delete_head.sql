-- pageviews patch: the batches of a partition before offset $2 (retention).
delete from record_batch where topition = $1 and base_offset < $2;
