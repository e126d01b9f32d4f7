-- A 5-minute rollup level beside the 1-minute and 1-hour ones of 0009 (issue 12): a day in
-- 5-minute buckets - the dashboard's default chart - reads 288 rows a metric instead of
-- 1,440. Same columns and meaning as readings_1m (see 0009); maintained the same way, by the
-- bridge in the batch's transaction (lms_core/rollups.py), hours, then 5 minutes, then
-- minutes.
CREATE TABLE readings_5m (LIKE readings_1m INCLUDING ALL) WITH (fillfactor = 80);

-- Built from the minute rollups, which hold everything this level needs exactly (sums,
-- counts, extremes, and the newest value with its time), under the lock that a backfill
-- takes (lms_core/rollups.py LOCK_KEY): no writer is between adding to the minute rollups
-- and committing while this runs. A bridge of an older version that writes after this
-- leaves the 5-minute level short of its batches: upgrade every bridge, then run
-- `lms rollups backfill` if one wrote meanwhile (README "Rollups").
SELECT pg_advisory_xact_lock(1280135940);  -- 0x4C4D5304
INSERT INTO readings_5m
SELECT device_id, metric, date_bin('5 minutes', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'), sum(n)::integer,
       sum(nv)::integer, sum(sum), min(min), max(max), max(last_time),
       (array_agg(last_value ORDER BY last_time DESC))[1]
FROM readings_1m GROUP BY 1, 2, 3;

CREATE OR REPLACE FUNCTION readings_retention(cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    edge timestamptz := date_bin('1 hour', cutoff, TIMESTAMPTZ '2000-01-01 00:00:00+00');
    deleted bigint;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1280135940);  -- 0x4C4D5304, lms_core/rollups.py LOCK_KEY
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        EXECUTE $q$SELECT count(*) FROM drop_chunks('readings', older_than => $1)$q$ USING edge;
    END IF;
    -- Hours, then 5 minutes, then minutes: the order in which bridges and purges lock them
    -- (0009 deleted minutes first, and a purge running at the same time could deadlock).
    DELETE FROM readings_1h WHERE bucket < edge;
    DELETE FROM readings_5m WHERE bucket < edge;
    DELETE FROM readings_1m WHERE bucket < edge;
    DELETE FROM readings WHERE time < edge;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;
