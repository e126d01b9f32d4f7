-- Alert rules evaluated by the bridge on the stream it commits; alerts; notifications
-- (MQTT alert messages and signed webhooks) through outboxes written in the transaction of
-- the alert change that causes them.

CREATE TABLE alert_rules (
    id               bigserial PRIMARY KEY,
    org_id           bigint NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name             text NOT NULL,
    -- threshold: metric <comparison> threshold, held for duration_s (device time);
    -- no_data:   no telemetry from the device for duration_s (receipt time);
    -- offline:   the device's status 'offline' held for duration_s.
    kind             text NOT NULL CHECK (kind IN ('threshold', 'no_data', 'offline')),
    metric           text,
    comparison       text CHECK (comparison IN ('>', '>=', '<', '<=', '==', '!=')),
    threshold        double precision,
    clear_threshold  double precision,          -- hysteresis: clears only past this value
    duration_s       integer NOT NULL DEFAULT 0 CHECK (duration_s >= 0),
    cooldown_s       integer NOT NULL DEFAULT 0 CHECK (cooldown_s >= 0),
    severity         text NOT NULL CHECK (severity IN ('critical', 'major', 'minor', 'warning', 'info')),
    enabled          boolean NOT NULL DEFAULT true,
    scope_kind       text NOT NULL CHECK (scope_kind IN ('device', 'tag', 'asset', 'org')),
    scope_device_id  bigint REFERENCES devices(id) ON DELETE CASCADE,
    scope_tag        text,
    scope_asset_id   bigint REFERENCES assets(id) ON DELETE CASCADE,
    created_by       bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'threshold') = (metric IS NOT NULL AND comparison IS NOT NULL AND threshold IS NOT NULL)),
    CHECK ((scope_kind = 'device') = (scope_device_id IS NOT NULL)),
    CHECK ((scope_kind = 'tag') = (scope_tag IS NOT NULL)),
    CHECK ((scope_kind = 'asset') = (scope_asset_id IS NOT NULL))
);
CREATE INDEX alert_rules_org ON alert_rules (org_id, id);

-- Evaluation state per (rule, device), locked (FOR UPDATE) by whichever bridge evaluates
-- that pair, in the transaction that stores the readings: several bridges on the shared
-- subscription stay exact, and a crash or a redelivered batch neither re-fires nor forgets.
CREATE TABLE rule_state (
    rule_id          bigint NOT NULL REFERENCES alert_rules(id) ON DELETE CASCADE,
    device_id        bigint NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    last_ts          timestamptz,     -- device time of the newest reading evaluated (older ones never flip the state)
    since            timestamptz,     -- device time since when the condition holds (waiting out duration_s)
    alert_id         bigint,          -- the firing alert, if any
    cooldown_until   timestamptz,     -- may not fire again before this (device time)
    last_seen_at     timestamptz,     -- no_data: receipt time of the newest telemetry
    PRIMARY KEY (rule_id, device_id)
);

CREATE TABLE alerts (
    id                     bigserial PRIMARY KEY,
    org_id                 bigint NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    rule_id                bigint REFERENCES alert_rules(id) ON DELETE SET NULL,
    device_id              bigint NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    rule_name              text NOT NULL,      -- kept: the history outlives the rule
    kind                   text NOT NULL,
    severity               text NOT NULL,
    metric                 text,
    state                  text NOT NULL CHECK (state IN ('firing', 'resolved')),
    value                  double precision,   -- the value that fired it
    fired_at               timestamptz NOT NULL,  -- device time (no_data/offline: the deadline)
    fired_evaluated_at     timestamptz NOT NULL,  -- when the platform decided
    resolved_value         double precision,
    resolved_at            timestamptz,
    resolved_evaluated_at  timestamptz,
    resolved_reason        text,               -- 'condition cleared', 'data again', 'rule deleted', ...
    acknowledged_at        timestamptz,
    acknowledged_by        bigint REFERENCES users(id) ON DELETE SET NULL
);
-- One active alert per (rule, device), whatever any bridge does.
CREATE UNIQUE INDEX alerts_one_firing ON alerts (rule_id, device_id) WHERE state = 'firing';
CREATE INDEX alerts_org ON alerts (org_id, id DESC);
CREATE INDEX alerts_device ON alerts (device_id, id DESC);

-- Alert messages to publish on {root}/{org}/{device}/alerts: written with the alert change,
-- published by a bridge after the commit, deleted once the broker acknowledged them.
CREATE TABLE mqtt_outbox (
    id          bigserial PRIMARY KEY,
    topic       text NOT NULL,
    payload     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhooks (
    id                    bigserial PRIMARY KEY,
    org_id                bigint NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    url                   text NOT NULL,
    secret                text NOT NULL,        -- HMAC key of X-LMS-Signature; shown once
    severities            text[] NOT NULL,
    enabled               boolean NOT NULL DEFAULT true,
    created_by            bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    consecutive_failures  integer NOT NULL DEFAULT 0,
    failing_since         timestamptz,          -- set while deliveries keep failing
    last_success_at       timestamptz,
    last_failure_at       timestamptz,
    last_error            text
);
CREATE INDEX webhooks_org ON webhooks (org_id);

-- The webhook outbox: one row per (alert change, webhook), written with the change.
CREATE TABLE webhook_deliveries (
    id               bigserial PRIMARY KEY,
    webhook_id       bigint NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    alert_id         bigint REFERENCES alerts(id) ON DELETE SET NULL,
    body             text NOT NULL,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id DESC);

-- Every attempt, readable over REST.
CREATE TABLE webhook_attempts (
    id           bigserial PRIMARY KEY,
    delivery_id  bigint NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    webhook_id   bigint NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    at           timestamptz NOT NULL DEFAULT now(),
    status_code  integer,
    error        text,
    duration_ms  integer NOT NULL
);
CREATE INDEX webhook_attempts_webhook ON webhook_attempts (webhook_id, id DESC);
-- A delivery's attempts, in order (GET .../deliveries/{id}/attempts), and the cascade of
-- deleting a delivery.
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);

-- The bridge caches rules, webhooks and the scope facts of devices (tags, assets). Any
-- change to them bumps this counter in its transaction; the bridge reads it before each
-- batch (with device_directory_version) and reloads what it cached when it moved.
CREATE TABLE rules_version (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    n   bigint NOT NULL
);
INSERT INTO rules_version (one, n) VALUES (true, 0);

CREATE FUNCTION bump_rules_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE rules_version SET n = n + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER alert_rules_changed AFTER INSERT OR UPDATE OR DELETE ON alert_rules
    FOR EACH STATEMENT EXECUTE FUNCTION bump_rules_version();
CREATE TRIGGER webhooks_changed AFTER INSERT OR UPDATE OF url, secret, severities, enabled OR DELETE ON webhooks
    FOR EACH STATEMENT EXECUTE FUNCTION bump_rules_version();
CREATE TRIGGER device_assets_changed AFTER INSERT OR UPDATE OR DELETE ON device_assets
    FOR EACH STATEMENT EXECUTE FUNCTION bump_rules_version();
CREATE TRIGGER devices_scope_changed AFTER INSERT OR DELETE OR UPDATE OF tags ON devices
    FOR EACH STATEMENT EXECUTE FUNCTION bump_rules_version();

-- The bridge's side (bridge/rules.py). The no-data/offline sweep resolves firing alerts
-- and skips pairs that already fire: it finds them through this index, not a scan.
CREATE INDEX rule_state_firing ON rule_state (rule_id, device_id) WHERE alert_id IS NOT NULL;
-- The offline sweep reads the offline devices of an organization, not all of them.
CREATE INDEX devices_offline ON devices (org_id, status_changed_at) WHERE status = 'offline';

-- The webhook sender looks at the oldest due delivery of each webhook (bridge/notify.py).
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (webhook_id, next_attempt_at) WHERE state = 'pending';
