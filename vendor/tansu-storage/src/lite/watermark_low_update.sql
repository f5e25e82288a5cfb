-- pageviews patch: the log start offset moves forward (retention), never back.
update watermark set low = max(coalesce(low, 0), $2) where topition = $1;
