-- Compress events segmented by (device_id, type), as 0001 now does for new installs.
-- The first 0001 segmented by device_id alone, and TimescaleDB warned that type, part of
-- the unique index (device_id, type, time), was neither segment-by nor order-by.
-- A no-op on plain PostgreSQL and wherever events is not a compressed hypertable. Runs as
-- the database owner (the table's owner may change its compression settings); the
-- extension is detected through pg_extension, which needs no privilege.
DO $$
DECLARE
    compressed boolean := false;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        EXECUTE $q$SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                                   WHERE hypertable_name = 'events' AND hypertable_schema = current_schema()
                                     AND compression_enabled)$q$ INTO compressed;
    END IF;
    IF compressed THEN
        -- TimescaleDB before 2.14 refuses new settings while compressed chunks exist; those
        -- chunks keep the old layout (still correct, only the warning remains), and the
        -- migration must not block every later one over it: say so and go on.
        BEGIN
            EXECUTE $q$ALTER TABLE events SET (timescaledb.compress,
                       timescaledb.compress_segmentby = 'device_id, type',
                       timescaledb.compress_orderby = 'time DESC')$q$;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'events keeps compress_segmentby = device_id (%); decompress its chunks and run '
                          'ALTER TABLE events SET (timescaledb.compress_segmentby = ''device_id, type'')', SQLERRM;
        END;
    END IF;
END
$$;
