-- pageviews patch: one produced record batch, one row (see ddl/046-record-batch.sql)
insert into record_batch
(topition, base_offset, last_offset, max_timestamp, bytes, batch, created_at)
values ($1, $2, $3, $4, $5, $6, $7);
