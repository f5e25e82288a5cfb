-- pageviews patch: a produced record batch is kept as one row, as it arrived (the Kafka
-- batch encoding, base offset set), the way Kafka's log segments keep batches. 0.6.0 kept a
-- row per record and a row per header, so a produce wrote and a fetch read one row per line
-- and re-encoded every batch (see PATCHED.md). `last_offset` is the batch's last offset,
-- `max_timestamp` its largest record timestamp (ms since the epoch, for retention by time)
-- and `bytes` the length of `batch` (for retention by size and fetch limits).
create table if not exists record_batch (
    topition integer not null references topition (id) on delete cascade,
    base_offset integer not null,
    last_offset integer not null,
    max_timestamp integer not null,
    bytes integer not null,
    batch blob not null,
    created_at integer not null,
    primary key (topition, base_offset)
);
