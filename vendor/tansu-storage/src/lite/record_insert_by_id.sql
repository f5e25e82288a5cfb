-- pageviews patch: insert by the partition's row id instead of a join per record, with the
-- batch's write time bound once ($9) rather than `current_timestamp` evaluated twice per row
-- (see PATCHED.md)
insert into record
(topition, offset_id, attributes, producer_id, producer_epoch, timestamp, k, v, last_updated, created_at)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9);
