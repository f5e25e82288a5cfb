-- pageviews patch: the headers of a range of records in one query, in the order they were
-- written (see PATCHED.md)
select offset_id, k, v
from header
where topition = $1
and offset_id >= $2
and offset_id <= $3
order by offset_id, rowid;
