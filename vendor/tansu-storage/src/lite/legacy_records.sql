-- pageviews patch: whether records of the row-per-record layout of 0.6.0 are left to read.
select exists (select 1 from record);
