-- Cloud to device: commands with a lifecycle (one row per command and device), fleet
-- commands (a group of such rows), and each device's desired / reported configuration.

-- A fleet command: the same command sent to every device with a tag or of an asset.
CREATE TABLE command_groups (
    id          bigserial PRIMARY KEY,
    org_id      bigint NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name        text NOT NULL,
    params      jsonb NOT NULL,
    target      jsonb NOT NULL,                    -- {"tag": "..."} or {"asset": "..."}
    created_by  bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX command_groups_org ON command_groups (org_id, id DESC);

-- States (DESIGN.md): pending -> delivered -> succeeded | failed, or expired, or cancelled.
-- A final state never changes; a result that arrives after it is recorded beside it.
CREATE TABLE commands (
    id            bigserial PRIMARY KEY,            -- the {id} of lms/{org}/{device}/commands/{id}
    org_id        bigint NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    device_id     bigint NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    group_id      bigint REFERENCES command_groups(id) ON DELETE CASCADE,
    name          text NOT NULL,
    params        jsonb NOT NULL,
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'delivered', 'succeeded', 'failed', 'expired', 'cancelled')),
    created_by    bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    sent_at       timestamptz,                      -- the broker acknowledged the publish
    delivered_at  timestamptz,                      -- first accepted / in_progress from the device
    finished_at   timestamptz,                      -- entered a final state
    -- The device's last answer: status as sent (accepted, in_progress, ok, error), when the
    -- bridge received it, its result and error. Kept after a final state too.
    reply_status  text,
    reply_at      timestamptz,
    result        jsonb,
    error         text
);
CREATE INDEX commands_device ON commands (device_id, id DESC);
CREATE INDEX commands_group ON commands (group_id) WHERE group_id IS NOT NULL;
-- What may still expire: small, whatever the history.
CREATE INDEX commands_open ON commands (expires_at) WHERE state IN ('pending', 'delivered');

-- The device shadow. The row stays when the desired document is deleted, so that the
-- version only ever goes up.
CREATE TABLE device_config (
    device_id         bigint PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    desired           jsonb,                         -- NULL: none (deleted or never set)
    desired_version   bigint NOT NULL DEFAULT 0,
    desired_at        timestamptz,
    desired_by        bigint REFERENCES users(id) ON DELETE SET NULL,
    reported          jsonb,
    reported_version  bigint,
    reported_at       timestamptz
);
