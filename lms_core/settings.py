"""Typed settings, read once from ``LMS_*`` environment variables and passed in.

Each field names its variable and default. ``Settings.from_env()`` validates every value
and raises :class:`~lms_core.errors.SettingsError` with a one-line message naming the
variable, so a typo never surfaces as a traceback deep inside a worker.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from lms_core.errors import SettingsError

#: The secret shipped for local development. Production mode refuses it.
DEV_SECRET = "dev-insecure-secret-change-me"


@dataclass(frozen=True, slots=True)
class MqttUrl:
    """A parsed ``mqtt://user:password@host:port`` URL (``mqtts://`` for TLS)."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str, *, var: str = "LMS_MQTT_URL") -> MqttUrl:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp"):
            raise SettingsError(f"{var}: scheme must be mqtt:// or mqtts://, got {url!r}")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError as exc:
            raise SettingsError(f"{var}: bad port in {url!r}") from exc
        if not parts.hostname:
            raise SettingsError(f"{var}: missing host in {url!r}")
        return cls(
            host=parts.hostname,
            port=port,
            username=urllib.parse.unquote(parts.username) if parts.username else None,
            password=urllib.parse.unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "mqtts",
        )

    def public(self) -> str:
        """The URL without credentials, safe to print and to hand to devices."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Limits:
    """What a device message may be. Breaking a limit sends the message to quarantine."""

    max_payload_bytes: int = 256 * 1024  # LMS_MAX_PAYLOAD_BYTES
    max_metrics: int = 200  # LMS_MAX_METRICS: per message, or per entry of a batch
    max_batch_entries: int = 1000  # LMS_MAX_BATCH_ENTRIES: offline-buffer flushes
    max_depth: int = 8  # LMS_MAX_DEPTH: nesting of objects flattened with "."
    max_text_chars: int = 1024  # LMS_MAX_TEXT_CHARS: a string metric's length
    metric_pattern: str = r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}"  # LMS_METRIC_PATTERN
    # A device flushing its offline buffer may send readings days old; a clock years off
    # (or seconds sent where milliseconds were meant) is refused, not stored in 1970.
    max_past_s: int = 30 * 86400  # LMS_MAX_PAST_SECONDS
    max_future_s: int = 300  # LMS_MAX_FUTURE_SECONDS


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    client_id: str = "lms-bridge-1"  # LMS_BRIDGE_CLIENT_ID: stable, one per bridge process
    # LMS_BRIDGE_SUBSCRIPTION: "exclusive" (one bridge) or "shared" (several bridges split
    # the load through $share/<group>/). Mosquitto 2.0 does not restore shared
    # subscriptions after a broker restart, so in shared mode what devices publish between
    # the broker's restart and the bridges' resubscription has no subscriber and is dropped;
    # an exclusive subscription is restored with the session and loses nothing. See README.
    subscription: str = "exclusive"
    group: str = "lms-bridge"  # LMS_BRIDGE_GROUP: shared-subscription group
    # Flush after this many messages or this many milliseconds, whichever first. 2,000
    # messages of 3 metrics is one COPY of ~6,000 rows: large enough that per-transaction
    # cost (~1 ms commit) is amortised, small enough to stay under the broker's in-flight
    # window (mosquitto.conf max_inflight_messages) so the next batch fills while this one
    # commits. 50 ms bounds the latency added to a lone message.
    batch_size: int = 2000  # LMS_BRIDGE_BATCH_SIZE
    flush_ms: int = 50  # LMS_BRIDGE_FLUSH_MS
    metrics_port: int = 9101  # LMS_BRIDGE_METRICS_PORT (0 = off)
    metrics_host: str = "127.0.0.1"  # LMS_BRIDGE_METRICS_HOST
    # LMS_BRIDGE_RETAINED_SWEEP_S: how often retained messages devices left on topics other
    # than status are cleared (bridge/retained.py); 0 = never. A retained message lives at
    # most this long; each sweep sees the live stream for about half a second.
    retained_sweep_s: int = 10


@dataclass(frozen=True, slots=True)
class ApiSettings:
    host: str = "127.0.0.1"  # LMS_API_HOST
    port: int = 8000  # LMS_API_PORT
    # LMS_API_REGISTRATION: self-service sign-up (on|off). Off by default: anyone who can
    # reach the API could otherwise create accounts, organizations and broker logins.
    registration: bool = False
    # When on: sign-ups per client address within the window (in PostgreSQL, so across processes).
    registration_max_per_address: int = 5  # LMS_API_REGISTRATION_MAX_PER_ADDRESS
    registration_window_s: int = 3600  # LMS_API_REGISTRATION_WINDOW_SECONDS
    cors_origins: tuple[str, ...] = ()  # LMS_API_CORS_ORIGINS: comma-separated; empty = no CORS
    cookie_secure: bool = False  # LMS_API_COOKIE_SECURE: set the Secure flag (default: on in production)
    access_ttl_s: int = 3600  # LMS_API_ACCESS_TTL_SECONDS: a login without "remember me"
    remember_ttl_s: int = 30 * 86400  # LMS_API_REMEMBER_TTL_SECONDS: a login with "remember me"
    # Failed logins tolerated within the window before answering 429: per (account, client
    # address) -- enough for typos, far too few for guessing -- and, much higher, per account
    # from all addresses and per address over all accounts. The last two do not hold a login
    # from an address the account has logged in from before (LMS_LOGIN_KNOWN_ADDRESS_DAYS),
    # so an attacker cannot lock the owner out. See api/auth/service.py.
    login_max_failures: int = 5  # LMS_LOGIN_MAX_FAILURES
    login_account_max_failures: int = 100  # LMS_LOGIN_ACCOUNT_MAX_FAILURES
    login_address_max_failures: int = 20  # LMS_LOGIN_ADDRESS_MAX_FAILURES
    login_window_s: int = 900  # LMS_LOGIN_WINDOW_SECONDS
    login_known_address_days: int = 90  # LMS_LOGIN_KNOWN_ADDRESS_DAYS
    audit_retention_days: int = 365  # LMS_AUDIT_RETENTION_DAYS: older audit rows are deleted
    retention_sweep_s: int = 3600  # LMS_RETENTION_SWEEP_SECONDS: how often the API prunes old rows
    # LMS_API_TRUSTED_PROXIES: addresses/networks of the load balancers in front of the API.
    # Only from them is X-Forwarded-For believed; anyone else could forge it to dodge the
    # per-address login limit.
    trusted_proxies: tuple[str, ...] = ()
    # Exports stream from a server-side cursor on a small pool of their own, so slow readers
    # never take the connections ordinary requests need. Beyond these many at once (per API
    # process, per user) an export is answered 429; a reader that takes nothing for the
    # stall time is cut off and its place freed.
    export_concurrency: int = 4  # LMS_API_EXPORT_CONCURRENCY: also the export pool's size
    exports_per_user: int = 2  # LMS_API_EXPORTS_PER_USER
    export_stall_s: int = 30  # LMS_API_EXPORT_STALL_SECONDS


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str  # LMS_DATABASE_URL
    mqtt: MqttUrl  # LMS_MQTT_URL (the platform service account)
    device_mqtt_url: str  # LMS_DEVICE_MQTT_URL: what devices are told to connect to
    topic_root: str = "lms"  # LMS_TOPIC_ROOT
    secret_key: str = DEV_SECRET  # LMS_SECRET_KEY: required (or LMS_DEV_INSECURE_SECRET=1 for this default)
    production: bool = False  # LMS_ENV=production
    # True when running on the public DEV_SECRET (LMS_DEV_INSECURE_SECRET=1); services warn.
    insecure_secret: bool = False
    log_level: str = "INFO"  # LMS_LOG_LEVEL
    limits: Limits = field(default_factory=Limits)
    bridge: BridgeSettings = field(default_factory=BridgeSettings)
    api: ApiSettings = field(default_factory=ApiSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, require_secret: bool = True) -> Settings:
        """Build settings from ``env`` (default ``os.environ``); raise SettingsError.

        ``require_secret=False`` is for commands that never sign or derive anything with
        the secret (``lms migrate``, ``lms broker-init``).
        """
        env = os.environ if env is None else env
        db = env.get("LMS_DATABASE_URL", "")
        if not db:
            raise SettingsError("LMS_DATABASE_URL is not set (e.g. postgresql://lms@127.0.0.1/lms)")
        if not db.startswith(("postgresql://", "postgres://")):
            raise SettingsError("LMS_DATABASE_URL must start with postgresql://")
        mqtt_url = env.get("LMS_MQTT_URL", "")
        if not mqtt_url:
            raise SettingsError("LMS_MQTT_URL is not set (e.g. mqtt://lms-service:PASSWORD@127.0.0.1:1883)")
        mqtt = MqttUrl.parse(mqtt_url)
        if not mqtt.username or not mqtt.password:
            raise SettingsError("LMS_MQTT_URL must carry the platform service account's user:password")
        production = _choice(env, "LMS_ENV", "development", ("development", "production")) == "production"
        secret = env.get("LMS_SECRET_KEY") or DEV_SECRET
        if production and (secret == DEV_SECRET or len(secret) < 32):
            raise SettingsError("LMS_SECRET_KEY must be set to a random value of 32+ characters in production")
        # The default is published: tokens signed with it, and device passwords derived from
        # it, are anyone's. It is taken only when asked for by name (LMS_DEV_INSECURE_SECRET=1).
        insecure = secret == DEV_SECRET
        if insecure and require_secret and _choice(env, "LMS_DEV_INSECURE_SECRET", "0", ("0", "1")) != "1":
            raise SettingsError("LMS_SECRET_KEY is not set (32+ random characters); for local development only, "
                                "LMS_DEV_INSECURE_SECRET=1 uses the public default")
        root = env.get("LMS_TOPIC_ROOT", "lms")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", root):
            raise SettingsError(f"LMS_TOPIC_ROOT must match [A-Za-z0-9_-]{{1,32}}, got {root!r}")
        device_url = env.get("LMS_DEVICE_MQTT_URL", mqtt.public())
        MqttUrl.parse(device_url, var="LMS_DEVICE_MQTT_URL")
        pattern = env.get("LMS_METRIC_PATTERN", _LIMITS.metric_pattern)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SettingsError(f"LMS_METRIC_PATTERN is not a valid regular expression: {exc}") from exc
        limits = Limits(
            max_payload_bytes=_int(env, "LMS_MAX_PAYLOAD_BYTES", _LIMITS.max_payload_bytes, 16, 256 * 1024 * 1024),
            max_metrics=_int(env, "LMS_MAX_METRICS", _LIMITS.max_metrics, 1, 100_000),
            max_batch_entries=_int(env, "LMS_MAX_BATCH_ENTRIES", _LIMITS.max_batch_entries, 1, 1_000_000),
            max_depth=_int(env, "LMS_MAX_DEPTH", _LIMITS.max_depth, 1, 64),
            max_text_chars=_int(env, "LMS_MAX_TEXT_CHARS", _LIMITS.max_text_chars, 1, 1_000_000),
            metric_pattern=pattern,
            max_past_s=_int(env, "LMS_MAX_PAST_SECONDS", _LIMITS.max_past_s, 1, 100 * 365 * 86400),
            max_future_s=_int(env, "LMS_MAX_FUTURE_SECONDS", _LIMITS.max_future_s, 0, 365 * 86400),
        )
        client_id = env.get("LMS_BRIDGE_CLIENT_ID", _BRIDGE.client_id)
        group = env.get("LMS_BRIDGE_GROUP", _BRIDGE.group)
        for var, value in (("LMS_BRIDGE_CLIENT_ID", client_id), ("LMS_BRIDGE_GROUP", group)):
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
                raise SettingsError(f"{var} must match [A-Za-z0-9_.-]{{1,64}}, got {value!r}")
        bridge = BridgeSettings(
            client_id=client_id,
            subscription=_choice(env, "LMS_BRIDGE_SUBSCRIPTION", _BRIDGE.subscription, ("exclusive", "shared")),
            group=group,
            batch_size=_int(env, "LMS_BRIDGE_BATCH_SIZE", _BRIDGE.batch_size, 1, 100_000),
            flush_ms=_int(env, "LMS_BRIDGE_FLUSH_MS", _BRIDGE.flush_ms, 1, 60_000),
            metrics_port=_int(env, "LMS_BRIDGE_METRICS_PORT", _BRIDGE.metrics_port, 0, 65535),
            metrics_host=env.get("LMS_BRIDGE_METRICS_HOST", _BRIDGE.metrics_host),
            retained_sweep_s=_int(env, "LMS_BRIDGE_RETAINED_SWEEP_S", _BRIDGE.retained_sweep_s, 0, 86400),
        )
        origins = tuple(o.strip() for o in env.get("LMS_API_CORS_ORIGINS", "").split(",") if o.strip())
        for origin in origins:
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise SettingsError(f"LMS_API_CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com")
        proxies = tuple(p.strip() for p in env.get("LMS_API_TRUSTED_PROXIES", "").split(",") if p.strip())
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise SettingsError(f"LMS_API_TRUSTED_PROXIES: {proxy!r} is not an address or network") from None
        api = ApiSettings(
            host=env.get("LMS_API_HOST", _API.host),
            port=_int(env, "LMS_API_PORT", _API.port, 1, 65535),
            registration=_choice(env, "LMS_API_REGISTRATION", "off", ("on", "off")) == "on",
            registration_max_per_address=_int(env, "LMS_API_REGISTRATION_MAX_PER_ADDRESS",
                                              _API.registration_max_per_address, 1, 1_000_000),
            registration_window_s=_int(env, "LMS_API_REGISTRATION_WINDOW_SECONDS", _API.registration_window_s,
                                       1, 7 * 86400),
            cors_origins=origins,
            cookie_secure=_choice(env, "LMS_API_COOKIE_SECURE", "on" if production else "off", ("on", "off")) == "on",
            access_ttl_s=_int(env, "LMS_API_ACCESS_TTL_SECONDS", _API.access_ttl_s, 10, 86400),
            remember_ttl_s=_int(env, "LMS_API_REMEMBER_TTL_SECONDS", _API.remember_ttl_s, 60, 365 * 86400),
            login_max_failures=_int(env, "LMS_LOGIN_MAX_FAILURES", _API.login_max_failures, 1, 1000),
            login_account_max_failures=_int(env, "LMS_LOGIN_ACCOUNT_MAX_FAILURES", _API.login_account_max_failures,
                                             1, 1_000_000),
            login_address_max_failures=_int(env, "LMS_LOGIN_ADDRESS_MAX_FAILURES", _API.login_address_max_failures,
                                             1, 100_000),
            login_window_s=_int(env, "LMS_LOGIN_WINDOW_SECONDS", _API.login_window_s, 1, 86400),
            login_known_address_days=_int(env, "LMS_LOGIN_KNOWN_ADDRESS_DAYS", _API.login_known_address_days, 1,
                                          3650),
            audit_retention_days=_int(env, "LMS_AUDIT_RETENTION_DAYS", _API.audit_retention_days, 1, 36500),
            retention_sweep_s=_int(env, "LMS_RETENTION_SWEEP_SECONDS", _API.retention_sweep_s, 1, 86400),
            trusted_proxies=proxies,
            export_concurrency=_int(env, "LMS_API_EXPORT_CONCURRENCY", _API.export_concurrency, 1, 100),
            exports_per_user=_int(env, "LMS_API_EXPORTS_PER_USER", _API.exports_per_user, 1, 100),
            export_stall_s=_int(env, "LMS_API_EXPORT_STALL_SECONDS", _API.export_stall_s, 1, 3600),
        )
        level = _choice(env, "LMS_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))
        return cls(
            database_url=db,
            mqtt=mqtt,
            device_mqtt_url=device_url,
            topic_root=root,
            secret_key=secret,
            production=production,
            insecure_secret=insecure,
            log_level=level,
            limits=limits,
            bridge=bridge,
            api=api,
        )


_LIMITS = Limits()
_BRIDGE = BridgeSettings()
_API = ApiSettings()


def _int(env: Mapping[str, str], var: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(var)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{var} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{var} must be between {lo} and {hi}, got {value}")
    return value


def _choice(env: Mapping[str, str], var: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(var, default)
    lookup = {c.lower(): c for c in choices}
    if value.lower() not in lookup:
        raise SettingsError(f"{var} must be one of {', '.join(choices)}, got {value!r}")
    return lookup[value.lower()]
