-- pageviews patch: insert by the partition's row id instead of a join per header, with the
-- batch's write time bound once ($5) (see PATCHED.md)
insert into header (topition, offset_id, k, v, last_updated, created_at)
values ($1, $2, $3, $4, $5, $5);
