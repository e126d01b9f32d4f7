-- Login throttling that an attacker cannot turn against the owner, rate-limited
-- registration, and the indexes the retention sweep deletes by.

-- Where each account has logged in successfully: a login from a known address is held
-- only by its own (account, address) limit, not by the per-account or per-address ones,
-- so failures from elsewhere cannot lock the owner (or a superuser behind a shared NAT) out.
CREATE TABLE login_known_addresses (
    user_id         bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    address         text NOT NULL,
    last_success_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, address)
);
CREATE INDEX login_known_addresses_at ON login_known_addresses (last_success_at);

-- Self-service registrations per client address, counted across API processes.
CREATE TABLE registration_attempts (
    id          bigserial PRIMARY KEY,
    address     text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX registration_attempts_address_at ON registration_attempts (address, at DESC);
CREATE INDEX registration_attempts_at ON registration_attempts (at);

CREATE INDEX login_failures_at ON login_failures (at);

-- Throttled logins are aggregated into one audit row per (account, address) and window;
-- this finds that row without scanning the window's whole log.
CREATE INDEX audit_log_throttled ON audit_log (target, address, at DESC) WHERE action = 'auth.login.throttled';
