-- Accounts, organizations' members and roles, API keys, token revocation, login
-- throttling, audit log, assets (sites) and device tags; technician MQTT credentials.

CREATE TABLE users (
    id              bigserial PRIMARY KEY,
    email           text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    password_hash   text NOT NULL,
    is_superuser    boolean NOT NULL DEFAULT false,
    -- Bumped by a password change: every token issued before carries an older number.
    token_version   integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email ON users (lower(email));

CREATE TABLE memberships (
    org_id      bigint NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'operator', 'viewer', 'technician')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX memberships_user ON memberships (user_id);

CREATE TABLE api_keys (
    id              bigserial PRIMARY KEY,
    org_id          bigint NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    user_id         bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name            text NOT NULL,
    role            text NOT NULL CHECK (role IN ('owner', 'admin', 'operator', 'viewer', 'technician')),
    prefix          text NOT NULL UNIQUE,
    key_hash        text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz
);

-- Logged-out tokens until they would have expired anyway.
CREATE TABLE revoked_tokens (
    jti         text PRIMARY KEY,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX revoked_tokens_expires ON revoked_tokens (expires_at);

-- Failed logins per account and per client address: the rate limit lives here so that it
-- holds across API processes.
CREATE TABLE login_failures (
    id          bigserial PRIMARY KEY,
    email       text NOT NULL,
    address     text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_email_at ON login_failures (lower(email), at DESC);
CREATE INDEX login_failures_address_at ON login_failures (address, at DESC);

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    org_id      bigint REFERENCES organizations(id) ON DELETE SET NULL,
    actor_user_id bigint REFERENCES users(id) ON DELETE SET NULL,
    actor_key_id  bigint REFERENCES api_keys(id) ON DELETE SET NULL,
    action      text NOT NULL,
    target      text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb,
    address     text,
    request_id  text
);
CREATE INDEX audit_log_org_at ON audit_log (org_id, at DESC);
CREATE INDEX audit_log_at ON audit_log (at DESC);

CREATE TABLE assets (
    id          bigserial PRIMARY KEY,
    org_id      bigint NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    slug        text NOT NULL CHECK (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name        text NOT NULL DEFAULT '',
    kind        text NOT NULL DEFAULT 'site',
    properties  jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, slug)
);

CREATE TABLE device_assets (
    device_id   bigint NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    asset_id    bigint NOT NULL REFERENCES assets(id) ON DELETE CASCADE,
    PRIMARY KEY (asset_id, device_id)
);
CREATE INDEX device_assets_device ON device_assets (device_id);

ALTER TABLE devices ADD COLUMN tags text[] NOT NULL DEFAULT '{}';

-- Subscribe-only broker logins for field technicians, one organization each.
CREATE TABLE mqtt_credentials (
    id          bigserial PRIMARY KEY,
    org_id      bigint NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    username    text NOT NULL UNIQUE,
    label       text NOT NULL DEFAULT '',
    nonce       text NOT NULL,
    created_by  bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz
);
