-- pageviews patch: the header table's foreign key and every header lookup go by
-- (topition, offset_id); 0.6.0 had no index for it (see PATCHED.md)
create index if not exists pageviews_header_record on header (topition, offset_id);
