-- Rollups of readings per (device, metric) at 1 minute and 1 hour (issue 12), maintained by
-- the bridge in the transaction that stores the readings, from the rows actually inserted
-- (lms_core/rollups.py). They answer avg, min, max, count and last for every bucket that is
-- a whole number of minutes or hours on an aligned origin (api/services/data.py).
--
-- n counts every reading (text ones too, as count(*) over raw rows does); nv, sum, min and
-- max only the numeric ones; last_value is the value (NULL for a text reading) of the
-- reading at last_time, the newest of the bucket. Readings are unique per (device, metric,
-- time), so two parts of one bucket never share a last_time.
--
-- fillfactor 80: the newest rows are updated once per batch; room on the page keeps those
-- updates HOT (only the primary key is indexed, and it never changes).
CREATE TABLE readings_1m (
    device_id   bigint NOT NULL,
    metric      text NOT NULL,
    bucket      timestamptz NOT NULL,
    n           integer NOT NULL,
    nv          integer NOT NULL,
    sum         double precision NOT NULL,
    min         double precision,
    max         double precision,
    last_time   timestamptz NOT NULL,
    last_value  double precision,
    PRIMARY KEY (device_id, metric, bucket)
) WITH (fillfactor = 80);

CREATE TABLE readings_1h (LIKE readings_1m INCLUDING ALL) WITH (fillfactor = 80);

-- Whether the rollups hold every stored reading. A database that has readings already when
-- this migration runs gets rollups only for what is written from now on, until
-- `lms rollups backfill` has built the rest (it sets complete_at; it is safe on a live system).
-- Until then the aggregate endpoint answers from raw rows, exactly but slowly.
CREATE TABLE rollup_state (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),
    complete_at  timestamptz
);
INSERT INTO rollup_state (complete_at)
SELECT CASE WHEN EXISTS (SELECT 1 FROM readings) THEN NULL ELSE now() END;

-- Retention of readings and their rollups together, in one transaction, on whole hours:
-- every reading before the hour of `cutoff` and every rollup bucket before it go, nothing
-- after. On TimescaleDB the chunks wholly before it are dropped first (cheap), then what is
-- left of them is deleted. The shared lock is the one every writer of rollups takes
-- (lms_core/rollups.py): a backfill never recomputes a bucket half deleted.
CREATE FUNCTION readings_retention(cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    edge timestamptz := date_bin('1 hour', cutoff, TIMESTAMPTZ '2000-01-01 00:00:00+00');
    deleted bigint;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1280135940);  -- 0x4C4D5304, lms_core/rollups.py LOCK_KEY
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        EXECUTE $q$SELECT count(*) FROM drop_chunks('readings', older_than => $1)$q$ USING edge;
    END IF;
    DELETE FROM readings_1m WHERE bucket < edge;
    DELETE FROM readings_1h WHERE bucket < edge;
    DELETE FROM readings WHERE time < edge;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

-- TimescaleDB: the retention policy of 0001 dropped chunks of readings behind the rollups'
-- back. It is replaced by a daily job that calls readings_retention (same 400 days), so the
-- rollups of dropped readings go in the same transaction. A continuous aggregate is not
-- used: it is refreshed behind a watermark and by policy, so late data, redeliveries counted
-- once, and purges would show only after its next refresh - not exact at every moment.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        BEGIN
            EXECUTE $q$CREATE PROCEDURE readings_retention_job(job_id integer, config jsonb)
                       LANGUAGE plpgsql AS $p$
                       BEGIN
                           PERFORM readings_retention(now() - (config->>'keep')::interval);
                       END
                       $p$ $q$;
            EXECUTE $q$SELECT remove_retention_policy('readings', if_exists => true)$q$;
            EXECUTE $q$SELECT add_job('readings_retention_job', INTERVAL '1 day',
                                      config => '{"keep": "400 days"}'::jsonb)$q$;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'readings keep their TimescaleDB retention policy (%); rollups of the readings it '
                          'drops stay until SELECT readings_retention(now() - INTERVAL ''400 days'') runs',
                          SQLERRM;
        END;
    END IF;
END
$$;
