"""Typed settings, declared once and read once from ``LMS_*`` environment variables.

Each setting is one annotated field of a frozen msgspec Struct per concern (:class:`Limits`,
:class:`BridgeSettings`, :class:`ApiSettings`, and :class:`Settings` for the rest): the
field's type and default, and a :func:`setting` marker with the variable's name, its bounds,
pattern or words, and a one-line help. Nothing else declares a variable: :meth:`Settings.from_env`
reads the environment through these declarations (msgspec checks the bounds and patterns)
and raises :class:`~lms_core.errors.SettingsError` with a one-line message naming the
variable, so a typo never surfaces as a traceback deep inside a worker; :func:`markdown_table`
renders the same declarations as the README's table (``lms settings --markdown``;
tests/test_settings_table.py fails when the README differs).

How a variable is read follows its field's type:

- ``int``: a decimal integer within the declared bounds; an empty value means the default;
- ``str``: as given; with ``match``, the whole value must match that pattern;
- ``Literal[...]``: one of the words, in any letter case;
- ``bool``: one of two words, ``words=(false, true)``, in any letter case;
- ``tuple[str, ...]``: comma-separated, blanks dropped.

What one field's type cannot say (the secret rules, the URLs, a regular expression that must
compile, each CORS origin, each proxy network, a default that depends on ``LMS_ENV``) is
written out in ``from_env``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import typing
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from lms_core.errors import SettingsError

#: The secret shipped for local development. Production mode refuses it.
DEV_SECRET = "dev-insecure-secret-change-me"

#: Where the README's generated table sits (tests/test_settings_table.py compares it).
README_START = "<!-- settings-table:start -->"
README_END = "<!-- settings-table:end -->"


def setting(env: str, doc: str, *, ge: int | None = None, le: int | None = None, match: str | None = None,
            words: tuple[str, str] | None = None, accepts: str | None = None,
            default_text: str | None = None) -> msgspec.Meta:
    """Declare the field's variable: ``env`` its name, ``doc`` one line of help for the README.

    ``ge``/``le`` bound an integer, ``match`` is a pattern a string must match whole, ``words``
    spell a bool's (false, true). ``accepts`` and ``default_text`` replace the README's
    rendering of the accepted values and of the default where the type cannot say them.
    """
    extra: dict[str, Any] = {"env": env}
    if match is not None:
        extra["match"] = match
    if words is not None:
        extra["words"] = words
    if accepts is not None:
        extra["accepts"] = accepts
    if default_text is not None:
        extra["default_text"] = default_text
    if match is not None:
        # msgspec's pattern is a search; anchored with \A and \Z (not $, which lets a trailing
        # newline through) it is the whole-value match the setting means.
        return msgspec.Meta(pattern=rf"\A(?:{match})\Z", description=doc, extra=extra)
    return msgspec.Meta(ge=ge, le=le, description=doc, extra=extra)


def _without_password(url: str) -> str:
    """``url`` with the password part of its user info replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, at, host = rest.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}{at}{host}"


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
        shown = _without_password(url)  # errors go to terminals and logs: never the password
        if parts.scheme not in ("mqtt", "mqtts", "tcp"):
            raise SettingsError(f"{var}: scheme must be mqtt:// or mqtts://, got {shown!r}")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError as exc:
            raise SettingsError(f"{var}: bad port in {shown!r}") from exc
        if not parts.hostname:
            raise SettingsError(f"{var}: missing host in {shown!r}")
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


class Limits(msgspec.Struct, frozen=True):
    """What a device message may be. Breaking a limit sends the message to quarantine."""

    max_payload_bytes: Annotated[int, setting(
        "LMS_MAX_PAYLOAD_BYTES", "larger messages are quarantined", ge=16, le=256 * 1024 * 1024)] = 256 * 1024
    max_metrics: Annotated[int, setting(
        "LMS_MAX_METRICS", "metrics per message (per entry of a batch)", ge=1, le=100_000)] = 200
    max_batch_entries: Annotated[int, setting(
        "LMS_MAX_BATCH_ENTRIES", "entries of a batch upload (a device flushing its offline buffer)",
        ge=1, le=1_000_000)] = 1000
    max_depth: Annotated[int, setting(
        "LMS_MAX_DEPTH", "nesting of objects (flattened with `.`)", ge=1, le=64)] = 8
    max_text_chars: Annotated[int, setting(
        "LMS_MAX_TEXT_CHARS", "length of a string metric", ge=1, le=1_000_000)] = 1024
    metric_pattern: Annotated[str, setting(
        "LMS_METRIC_PATTERN", "metric names (after flattening) must match it whole",
        accepts="a regular expression")] = r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}"
    # A device flushing its offline buffer may send readings days old; a clock years off
    # (or seconds sent where milliseconds were meant) is refused, not stored in 1970.
    max_past_s: Annotated[int, setting(
        "LMS_MAX_PAST_SECONDS", "how old a device timestamp may be, against the time of receipt",
        ge=1, le=100 * 365 * 86400)] = 30 * 86400
    max_future_s: Annotated[int, setting(
        "LMS_MAX_FUTURE_SECONDS", "how far ahead of the time of receipt a device timestamp may be",
        ge=0, le=365 * 86400)] = 300


class BridgeSettings(msgspec.Struct, frozen=True):
    client_id: Annotated[str, setting(
        "LMS_BRIDGE_CLIENT_ID", "stable MQTT client id: one per bridge process, kept across restarts",
        match=r"[A-Za-z0-9_.-]{1,64}")] = "lms-bridge-1"
    # Mosquitto 2.0 does not restore shared subscriptions after a broker restart, so in
    # shared mode what devices publish between the broker's restart and the bridges'
    # resubscription has no subscriber and is dropped; an exclusive subscription is restored
    # with the session and loses nothing. See README.
    subscription: Annotated[Literal["exclusive", "shared"], setting(
        "LMS_BRIDGE_SUBSCRIPTION", "`exclusive` for one bridge; `shared` splits the load between several "
        "through `$share/<group>/` (see below)")] = "exclusive"
    group: Annotated[str, setting(
        "LMS_BRIDGE_GROUP", "shared-subscription group", match=r"[A-Za-z0-9_.-]{1,64}")] = "lms-bridge"
    # Flush after this many messages or this many milliseconds, whichever first. 2,000
    # messages of 3 metrics is one COPY of ~6,000 rows: large enough that per-transaction
    # cost (~1 ms commit) is amortised, small enough to stay under the broker's in-flight
    # window (mosquitto.conf max_inflight_messages) so the next batch fills while this one
    # commits. 50 ms bounds the latency added to a lone message.
    batch_size: Annotated[int, setting(
        "LMS_BRIDGE_BATCH_SIZE", "flush after this many messages (or `LMS_BRIDGE_FLUSH_MS`, whichever first)",
        ge=1, le=100_000)] = 2000
    flush_ms: Annotated[int, setting(
        "LMS_BRIDGE_FLUSH_MS", "a partial batch is committed once its oldest message has waited this many ms "
        "(or at `LMS_BRIDGE_BATCH_SIZE` messages)",
        ge=1, le=60_000)] = 50
    # `asyncio` reads MQTT through lms_core/mqtt_fast.py (issue 14): every packet of a read
    # parsed in one pass, no paho. The default since the whole suite passed on it; `paho`
    # stays as a fallback (tests/test_faults.py runs both).
    receiver: Annotated[Literal["paho", "asyncio"], setting(
        "LMS_BRIDGE_RECEIVER", "how the bridge reads MQTT: `asyncio` (the bridge's own MQTT 3.1.1 session: a third "
        "of paho's CPU per message) or `paho` (paho-mqtt, the fallback)")] = "asyncio"
    metrics_port: Annotated[int, setting(
        "LMS_BRIDGE_METRICS_PORT", "Prometheus metrics port of the bridge (0 turns it off)", ge=0, le=65535)] = 9101
    metrics_host: Annotated[str, setting(
        "LMS_BRIDGE_METRICS_HOST", "address the bridge's metrics port listens on")] = "127.0.0.1"
    # Each sweep sees the live stream for about half a second (bridge/retained.py).
    retained_sweep_s: Annotated[int, setting(
        "LMS_BRIDGE_RETAINED_SWEEP_S", "seconds between sweeps clearing retained messages left on device topics "
        "other than `status` by a broker without the lms_retain plugin (0 = never)",
        ge=0, le=86400)] = 300
    # 300 s: the broker plugin refuses such messages, so the sweep is defence in depth. Each
    # sweep also receives the live stream for about half a second (bridge/retained.py): at
    # 10 s that cost the bridge ~5% of its live throughput in bench/ingest.py, at 300 s ~0.2%.
    # Off only to measure what rollups cost (bench/ingest.py): a bridge that does not maintain
    # them marks them incomplete when it starts, and the aggregate endpoint then reads raw rows
    # until `lms rollups backfill` has rebuilt them.
    rollups: Annotated[bool, setting(
        "LMS_BRIDGE_ROLLUPS", "maintain the 1-minute and 1-hour rollups of readings on ingest "
        "(`off` marks them incomplete until `lms rollups backfill`)", words=("off", "on"))] = True


class ApiSettings(msgspec.Struct, frozen=True):
    host: Annotated[str, setting("LMS_API_HOST", "address `lms api` listens on")] = "127.0.0.1"
    port: Annotated[int, setting("LMS_API_PORT", "port `lms api` listens on", ge=1, le=65535)] = 8000
    # Off by default: anyone who can reach the API could otherwise create accounts,
    # organizations and broker logins.
    registration: Annotated[bool, setting(
        "LMS_API_REGISTRATION", "self-service sign-up (`off`: accounts only by `lms user create` or an admin)",
        words=("off", "on"))] = False
    # Counted in PostgreSQL, so across API processes.
    registration_max_per_address: Annotated[int, setting(
        "LMS_API_REGISTRATION_MAX_PER_ADDRESS", "sign-ups per client address within the window (when on)",
        ge=1, le=1_000_000)] = 5
    registration_window_s: Annotated[int, setting(
        "LMS_API_REGISTRATION_WINDOW_SECONDS", "the window of `LMS_API_REGISTRATION_MAX_PER_ADDRESS`",
        ge=1, le=7 * 86400)] = 3600
    cors_origins: Annotated[tuple[str, ...], setting(
        "LMS_API_CORS_ORIGINS", "origins allowed to call the API from a browser, with credentials",
        accepts="comma-separated origins like `https://app.example.com`", default_text="empty (CORS off)")] = ()
    cookie_secure: Annotated[bool, setting(
        "LMS_API_COOKIE_SECURE", "the session cookie's Secure flag (also set whenever the request came over HTTPS)",
        words=("off", "on"), default_text="`on` in production, else `off`")] = False
    access_ttl_s: Annotated[int, setting(
        "LMS_API_ACCESS_TTL_SECONDS", "lifetime of a login without \"remember me\"", ge=10, le=86400)] = 3600
    remember_ttl_s: Annotated[int, setting(
        "LMS_API_REMEMBER_TTL_SECONDS", "lifetime of a login with \"remember me\"",
        ge=60, le=365 * 86400)] = 30 * 86400
    # Failed logins tolerated within the window before answering 429: per (account, client
    # address) -- enough for typos, far too few for guessing -- and, much higher, per account
    # from all addresses and per address over all accounts. The last two do not hold a login
    # from an address the account has logged in from before (LMS_LOGIN_KNOWN_ADDRESS_DAYS),
    # so an attacker cannot lock the owner out. See api/auth/service.py.
    login_max_failures: Annotated[int, setting(
        "LMS_LOGIN_MAX_FAILURES", "failed logins per (account, client address) within the window before 429",
        ge=1, le=1000)] = 5
    login_account_max_failures: Annotated[int, setting(
        "LMS_LOGIN_ACCOUNT_MAX_FAILURES", "failed logins per account from all addresses within the window "
        "(not applied to a known address)", ge=1, le=1_000_000)] = 100
    login_address_max_failures: Annotated[int, setting(
        "LMS_LOGIN_ADDRESS_MAX_FAILURES", "failed logins per client address over all accounts within the window "
        "(not applied to a known address)", ge=1, le=100_000)] = 20
    login_window_s: Annotated[int, setting(
        "LMS_LOGIN_WINDOW_SECONDS", "the window of the failed-login limits", ge=1, le=86400)] = 900
    login_known_address_days: Annotated[int, setting(
        "LMS_LOGIN_KNOWN_ADDRESS_DAYS", "an address an account logged in from within this many days is known",
        ge=1, le=3650)] = 90
    audit_retention_days: Annotated[int, setting(
        "LMS_AUDIT_RETENTION_DAYS", "audit rows older than this many days are deleted", ge=1, le=36500)] = 365
    retention_sweep_s: Annotated[int, setting(
        "LMS_RETENTION_SWEEP_SECONDS", "how often the API prunes old rows", ge=1, le=86400)] = 3600
    # Only from these is X-Forwarded-For believed; anyone else could forge it to dodge the
    # per-address login limit.
    trusted_proxies: Annotated[tuple[str, ...], setting(
        "LMS_API_TRUSTED_PROXIES", "load balancers whose `X-Forwarded-For` is believed (for the per-address "
        "limits); from anyone else it is ignored", accepts="comma-separated addresses or networks",
        default_text="empty")] = ()
    # Exports stream from a server-side cursor on a small pool of their own, so slow readers
    # never take the connections ordinary requests need. Beyond these many at once (per API
    # process, per user) an export is answered 429; a reader that takes nothing for the
    # stall time is cut off and its place freed.
    export_concurrency: Annotated[int, setting(
        "LMS_API_EXPORT_CONCURRENCY", "exports at once per API process (also the export pool's size)",
        ge=1, le=100)] = 4
    exports_per_user: Annotated[int, setting(
        "LMS_API_EXPORTS_PER_USER", "exports at once per user", ge=1, le=100)] = 2
    export_stall_s: Annotated[int, setting(
        "LMS_API_EXPORT_STALL_SECONDS", "an export reader that takes nothing for this long is cut off",
        ge=1, le=3600)] = 30
    # The stall limit is per write: a reader taking a trickle (say 100 kB/s) is never stalled,
    # and would hold its slot, a pool connection and an open transaction (pinning the xmin
    # horizon: VACUUM cannot clean behind it) for as long as it likes. A whole export has
    # this long; the export pool's sessions are also ended by PostgreSQL past it (api/app.py).
    export_max_s: Annotated[int, setting(
        "LMS_API_EXPORT_MAX_SECONDS", "an export still streaming after this long is cut off, however steadily "
        "its reader takes it (narrow the time range for more)", ge=1, le=86400)] = 600


    # WebSocket streams (api/stream/): per API process.
    ws_queue_frames: Annotated[int, setting(
        "LMS_API_WS_QUEUE_FRAMES", "frames a stream client may have waiting before it is disconnected as too slow "
        "(or, with ?overflow=drop, loses its oldest)", ge=10, le=100_000)] = 1000
    # Frames alone do not bound memory: a message may be as large as the broker takes (260 KiB
    # in mosquitto.conf), so 1000 of them unread were 260 MB per stream. 4 MiB holds 1000 frames
    # of 4 KiB (a dashboard's burst); one user's streams then hold at most 20 x 4 MiB.
    ws_queue_bytes: Annotated[int, setting(
        "LMS_API_WS_QUEUE_BYTES", "characters of frames a stream client may have waiting (with "
        "LMS_API_WS_QUEUE_FRAMES, whichever is reached first)", ge=65_536, le=1 << 30)] = 4 << 20
    ws_max_clients: Annotated[int, setting(
        "LMS_API_WS_MAX_CLIENTS", "WebSocket streams one API process serves at once", ge=1, le=100_000)] = 5000
    ws_max_per_user: Annotated[int, setting(
        "LMS_API_WS_MAX_PER_USER", "WebSocket streams one user (or API key's creator) may hold at once per API "
        "process", ge=1, le=10_000)] = 20
    ws_max_filters: Annotated[int, setting(
        "LMS_API_WS_MAX_FILTERS", "topic filters one stream may hold", ge=1, le=10_000)] = 100
    ws_recheck_s: Annotated[int, setting(
        "LMS_API_WS_RECHECK_SECONDS", "how often a stream checks that its token, key and membership still hold "
        "(also on every subscribe)", ge=1, le=60)] = 30
    # Cloud to device (api/services/commands.py, api/services/config.py).
    command_max_ttl_s: Annotated[int, setting(
        "LMS_COMMAND_MAX_TTL_SECONDS", "the longest a command may wait for its device (its ttl_seconds)",
        ge=1, le=30 * 86400)] = 7 * 86400
    command_params_max_bytes: Annotated[int, setting(
        "LMS_COMMAND_PARAMS_MAX_BYTES", "largest command params, as JSON", ge=2, le=256 * 1024)] = 8 * 1024
    fleet_max_devices: Annotated[int, setting(
        "LMS_COMMAND_FLEET_MAX_DEVICES", "most devices one fleet command may address", ge=1, le=100_000)] = 10_000
    config_max_bytes: Annotated[int, setting(
        "LMS_CONFIG_MAX_BYTES", "largest desired configuration document, as JSON", ge=2, le=256 * 1024)] = 16 * 1024


class AlertSettings(msgspec.Struct, frozen=True):
    """Alert rules and their webhooks (api/services/rules.py, api/services/webhooks.py,
    bridge/notify.py)."""

    # The bridge keeps every enabled rule in memory and matches each reading against those of
    # its metric (issue 9's bench: 1,000 rules in one organization); the limit keeps one
    # organization from growing that without bound.
    max_rules_per_org: Annotated[int, setting(
        "LMS_RULES_MAX_PER_ORG", "most alert rules one organization may have", ge=1, le=100_000)] = 2000
    max_webhooks_per_org: Annotated[int, setting(
        "LMS_WEBHOOKS_MAX_PER_ORG", "most webhooks one organization may have", ge=1, le=1000)] = 20
    # Off: a webhook URL whose host is (or resolves to) a loopback, private, link-local,
    # multicast, unspecified or reserved address is refused, when it is saved and again at each
    # delivery -- anyone who may manage rules could otherwise make the platform call its own
    # network (server-side request forgery), e.g. a cloud metadata service.
    webhook_allow_private: Annotated[bool, setting(
        "LMS_WEBHOOK_ALLOW_PRIVATE", "`1` lets webhooks call loopback, private and link-local addresses "
        "(tests, a receiver on the same network); `0` refuses them", words=("0", "1"))] = False
    # A slow receiver costs one of the sender's slots for at most this long per attempt.
    webhook_timeout_s: Annotated[int, setting(
        "LMS_WEBHOOK_TIMEOUT_SECONDS", "one webhook attempt (connect, send, answer) is given up after this long",
        ge=1, le=60)] = 5
    webhook_concurrency: Annotated[int, setting(
        "LMS_WEBHOOK_CONCURRENCY", "webhook requests in flight at once per bridge process (at most one per "
        "webhook)", ge=1, le=1000)] = 8
    # 2, 4, 8 ... s: a receiver that is down for a deploy gets its backlog within seconds of
    # coming back; the cap keeps a long outage to a few attempts an hour per delivery.
    webhook_backoff_ms: Annotated[int, setting(
        "LMS_WEBHOOK_BACKOFF_MS", "wait before the first retry of a failed webhook delivery; doubled after "
        "each further failure", ge=1, le=3_600_000)] = 2000
    webhook_backoff_max_s: Annotated[int, setting(
        "LMS_WEBHOOK_BACKOFF_MAX_SECONDS", "longest wait between two attempts of a delivery",
        ge=1, le=86400)] = 900
    webhook_retry_s: Annotated[int, setting(
        "LMS_WEBHOOK_RETRY_SECONDS", "a delivery still failing this long after its alert change is given up "
        "(`failed`)", ge=1, le=30 * 86400)] = 86400


class Settings(msgspec.Struct, frozen=True):
    database_url: Annotated[str, setting(
        "LMS_DATABASE_URL", "the database", accepts="`postgresql://user:password@host:port/db`",
        default_text="— (required)")]
    mqtt: Annotated[MqttUrl, setting(
        "LMS_MQTT_URL", "the platform's service account on the broker",
        accepts="`mqtt://lms-service:PASSWORD@host:1883` (`mqtts://` for TLS)", default_text="— (required)")]
    device_mqtt_url: Annotated[str, setting(
        "LMS_DEVICE_MQTT_URL", "the broker URL handed to devices", accepts="`mqtt://host:port` or `mqtts://…`",
        default_text="the broker part of `LMS_MQTT_URL`")]
    topic_root: Annotated[str, setting(
        "LMS_TOPIC_ROOT", "first topic level", match=r"[A-Za-z0-9_-]{1,32}")] = "lms"
    secret_key: Annotated[str, setting(
        "LMS_SECRET_KEY", "platform secret (signs tokens, derives device passwords); required, unless "
        "`LMS_DEV_INSECURE_SECRET=1`", accepts="32+ random characters in production",
        default_text="— (required)")] = DEV_SECRET
    production: Annotated[bool, setting(
        "LMS_ENV", "`production` refuses a short or default `LMS_SECRET_KEY` and turns the Secure cookie on",
        words=("development", "production"))] = False
    # The default secret is published: tokens signed with it, and device passwords derived
    # from it, are anyone's. It is taken only when asked for by name.
    dev_insecure_secret: Annotated[bool, setting(
        "LMS_DEV_INSECURE_SECRET", "`1` runs without `LMS_SECRET_KEY` on the public development secret "
        "(never in production; services warn at start)", words=("0", "1"))] = False
    # True when running on the public DEV_SECRET; services warn.
    insecure_secret: bool = False
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], setting(
        "LMS_LOG_LEVEL", "JSON log lines on stderr from this level up")] = "INFO"
    limits: Limits = msgspec.field(default_factory=Limits)
    bridge: BridgeSettings = msgspec.field(default_factory=BridgeSettings)
    api: ApiSettings = msgspec.field(default_factory=ApiSettings)
    alerts: AlertSettings = msgspec.field(default_factory=AlertSettings)

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
        top = _read(cls, env)
        production = bool(top["production"])
        secret = env.get("LMS_SECRET_KEY") or DEV_SECRET
        if production and (secret == DEV_SECRET or len(secret) < 32):
            raise SettingsError("LMS_SECRET_KEY must be set to a random value of 32+ characters in production")
        insecure = secret == DEV_SECRET
        if insecure and require_secret and not top["dev_insecure_secret"]:
            raise SettingsError("LMS_SECRET_KEY is not set (32+ random characters); for local development only, "
                                "LMS_DEV_INSECURE_SECRET=1 uses the public default")
        device_url = env.get("LMS_DEVICE_MQTT_URL", mqtt.public())
        MqttUrl.parse(device_url, var="LMS_DEVICE_MQTT_URL")

        limits = Limits(**_read(Limits, env))
        try:
            re.compile(limits.metric_pattern)
        except re.error as exc:
            raise SettingsError(f"LMS_METRIC_PATTERN is not a valid regular expression: {exc}") from exc
        bridge = BridgeSettings(**_read(BridgeSettings, env))
        api_values = _read(ApiSettings, env)
        if "LMS_API_COOKIE_SECURE" not in env:
            api_values["cookie_secure"] = production
        for origin in api_values["cors_origins"]:
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise SettingsError(f"LMS_API_CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com")
        for proxy in api_values["trusted_proxies"]:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise SettingsError(f"LMS_API_TRUSTED_PROXIES: {proxy!r} is not an address or network") from None
        api = ApiSettings(**api_values)
        alerts = AlertSettings(**_read(AlertSettings, env))
        return cls(**{**top, "database_url": db, "mqtt": mqtt, "device_mqtt_url": device_url, "secret_key": secret,
                      "insecure_secret": insecure, "limits": limits, "bridge": bridge, "api": api,
                      "alerts": alerts})


# -- reading the declarations ---------------------------------------------------------

class Declared(NamedTuple):
    """One declared setting: the field it fills and what :func:`setting` said about it."""

    field: str
    var: str
    type: Any  # the field's type without its annotation, e.g. int or Literal["a", "b"]
    annotated: Any  # the field's full type, which msgspec checks a value against
    meta: msgspec.Meta
    default: Any  # msgspec.NODEFAULT when required

    @property
    def extra(self) -> dict[str, Any]:
        return self.meta.extra or {}


def declared(cls: type[msgspec.Struct], *, nested: bool = True) -> Iterator[Declared]:
    """The settings ``cls`` declares, in order; with ``nested``, those of its settings Structs in place."""
    for f in msgspec.structs.fields(cls):
        if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct):
            if nested:
                yield from declared(f.type)
            continue
        if typing.get_origin(f.type) is not Annotated:
            continue  # derived, not read from the environment (e.g. insecure_secret)
        base, *metas = typing.get_args(f.type)
        meta = next(m for m in metas if isinstance(m, msgspec.Meta) and m.extra and "env" in m.extra)
        assert meta.extra is not None
        yield Declared(f.name, meta.extra["env"], base, f.type, meta, f.default)


def _read(cls: type[msgspec.Struct], env: Mapping[str, str]) -> dict[str, Any]:
    """``cls``'s own settings with a default, by field name: read from ``env``, checked.

    Required settings (no default: the URLs) are ``from_env``'s to read.
    """
    values: dict[str, Any] = {}
    for d in declared(cls, nested=False):
        if d.default is msgspec.NODEFAULT:
            continue
        raw = env.get(d.var)
        values[d.field] = d.default if raw is None else _parse(d, raw)
    return values


def _parse(d: Declared, raw: str) -> Any:
    if d.type is int:
        if raw == "":
            return d.default
        try:
            return _checked(d, int(raw))
        except (ValueError, msgspec.ValidationError):
            raise SettingsError(f"{d.var} must be an integer between {d.meta.ge} and {d.meta.le}, "
                                f"got {raw!r}") from None
    if d.type is bool or typing.get_origin(d.type) is Literal:
        words: tuple[str, ...] = d.extra["words"] if d.type is bool else typing.get_args(d.type)
        lookup = {w.lower(): w for w in words}
        if raw.lower() not in lookup:
            raise SettingsError(f"{d.var} must be one of {', '.join(words)}, got {raw!r}")
        word = lookup[raw.lower()]
        return word == words[1] if d.type is bool else word
    if d.type == tuple[str, ...]:
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if d.type is str:
        try:
            return _checked(d, raw)
        except msgspec.ValidationError:
            raise SettingsError(f"{d.var} must match {d.extra['match']}, got {raw!r}") from None
    raise TypeError(f"{d.var}: no reader for a setting of type {d.type!r}")  # a declaration's mistake


def _checked(d: Declared, value: Any) -> Any:
    """``value`` if it meets the declaration's bounds or pattern (msgspec checks them)."""
    return msgspec.convert(value, d.annotated)


# -- the README's table ---------------------------------------------------------------

def markdown_table() -> str:
    """Every setting as a Markdown table, in declaration order (the README's settings table)."""
    rows = ["| variable | default | accepted values | meaning |", "|---|---|---|---|"]
    for d in declared(Settings):
        cells = (f"`{d.var}`", _default_text(d), _accepts_text(d), d.meta.description or "")
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def _default_text(d: Declared) -> str:
    if "default_text" in d.extra:
        return str(d.extra["default_text"])
    if d.type is bool:
        return f"`{d.extra['words'][bool(d.default)]}`"
    if d.type is int:
        text = str(d.default)
        if d.var.endswith(("_SECONDS", "_S")) and d.default >= 3600:
            text += f" ({_duration(d.default)})"
        return text
    return f"`{d.default}`"


def _accepts_text(d: Declared) -> str:
    if "accepts" in d.extra:
        return str(d.extra["accepts"])
    if d.type is int:
        return f"{d.meta.ge}–{d.meta.le}"
    if d.type is bool:
        return ", ".join(f"`{w}`" for w in d.extra["words"])
    if typing.get_origin(d.type) is Literal:
        return ", ".join(f"`{w}`" for w in typing.get_args(d.type))
    if "match" in d.extra:
        return f"`{d.extra['match']}`"
    return "any"


def _duration(seconds: int) -> str:
    for unit, size in (("day", 86400), ("hour", 3600)):
        if seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds / 3600:g} hours"
