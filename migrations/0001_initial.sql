-- Initial schema: organizations, devices, readings, events, quarantine.
-- Must run on plain PostgreSQL 15+ and on PostgreSQL 17 with TimescaleDB.

CREATE TABLE organizations (
    id          bigserial PRIMARY KEY,
    slug        text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    id                  bigserial PRIMARY KEY,
    org_id              bigint NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    slug                text NOT NULL CHECK (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name                text NOT NULL DEFAULT '',
    properties          jsonb NOT NULL DEFAULT '{}'::jsonb,
    enabled             boolean NOT NULL DEFAULT true,
    -- The broker password is derived from the platform secret and this nonce, never
    -- stored, so the broker can be rebuilt from the database (see lms_core/provisioning.py).
    credential_nonce    text NOT NULL,
    credentials_rotated_at timestamptz NOT NULL DEFAULT now(),
    status              text NOT NULL DEFAULT 'unknown' CHECK (status IN ('unknown', 'online', 'offline')),
    status_changed_at   timestamptz,
    last_seen_at        timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, slug)
);

-- One row per (device, metric, time). No foreign key: ingest speed, and deleting a
-- device may keep its data. The unique index is both the de-duplication of redelivered
-- messages and the index every per-device query uses.
CREATE TABLE readings (
    time        timestamptz NOT NULL,
    device_id   bigint NOT NULL,
    metric      text NOT NULL,
    value       double precision,
    text_value  text
);
CREATE UNIQUE INDEX readings_device_metric_time ON readings (device_id, metric, time DESC);

CREATE TABLE events (
    time        timestamptz NOT NULL,
    device_id   bigint NOT NULL,
    type        text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}'::jsonb,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX events_device_type_time ON events (device_id, type, time DESC);
CREATE INDEX events_device_time ON events (device_id, time DESC);

CREATE TABLE quarantine (
    id          bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    topic       text NOT NULL,
    payload     bytea NOT NULL,
    reason      text NOT NULL,
    org_slug    text,
    device_slug text
);
CREATE INDEX quarantine_received_at ON quarantine (received_at DESC);
CREATE INDEX quarantine_org_received_at ON quarantine (org_slug, received_at DESC);

-- TimescaleDB, only where the extension is installed and preloaded. Nothing queries
-- through TimescaleDB functions; this only changes how the data is laid out on disk.
-- Runs as the database's owner, not a superuser: shared_preload_libraries is unreadable
-- to it ("must be superuser or have privileges of pg_read_all_settings"). So the
-- extension counts as present if an administrator created it in this database (the
-- TimescaleDB image does, in POSTGRES_DB and template1), or if creating it here succeeds;
-- a refusal (not preloaded, not allowed to this role) is rolled back in its own
-- sub-block and leaves plain PostgreSQL tables, as on a server without the extension.
DO $$
DECLARE
    timescale boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb');
BEGIN
    IF NOT timescale AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
            timescale := true;
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'timescaledb is installed but not usable here (%); plain tables', SQLERRM;
        END;
    END IF;
    IF timescale THEN
        EXECUTE $q$SELECT create_hypertable('readings', 'time', chunk_time_interval => INTERVAL '1 day')$q$;
        EXECUTE $q$SELECT create_hypertable('events', 'time', chunk_time_interval => INTERVAL '7 days')$q$;
        EXECUTE $q$ALTER TABLE readings SET (timescaledb.compress,
                   timescaledb.compress_segmentby = 'device_id, metric',
                   timescaledb.compress_orderby = 'time DESC')$q$;
        -- type is in the unique index (device_id, type, time): segmenting by it keeps the
        -- index usable on compressed chunks (TimescaleDB warns otherwise).
        EXECUTE $q$ALTER TABLE events SET (timescaledb.compress,
                   timescaledb.compress_segmentby = 'device_id, type',
                   timescaledb.compress_orderby = 'time DESC')$q$;
        EXECUTE $q$SELECT add_compression_policy('readings', INTERVAL '7 days')$q$;
        EXECUTE $q$SELECT add_compression_policy('events', INTERVAL '30 days')$q$;
        EXECUTE $q$SELECT add_retention_policy('readings', INTERVAL '400 days')$q$;
        EXECUTE $q$SELECT add_retention_policy('events', INTERVAL '400 days')$q$;
    END IF;
END
$$;
