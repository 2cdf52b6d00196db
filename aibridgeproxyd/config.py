"""The daemon's typed configuration, parsed and validated in one place.

Precedence (README.md#configuration): flags > environment ``AIBRIDGEPROXYD_<KEY>`` > YAML file >
defaults. An unknown YAML key, an ``AIBRIDGEPROXYD_*`` variable that names no key, a key written
twice in the file, or an invalid value raises ``ConfigError`` naming the key and where it came
from.

Every value is parsed here, once, into the type the daemon uses (``UpstreamProxy``, ``NoProxy``,
``HostPort``, seconds for durations, which need a unit), and the PEM files the configuration
names are read and checked, so the CLI refuses exactly what the daemon would.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from aibridgeproxyd.database_url import DatabaseUrl, parse_database_url
from aibridgeproxyd.pem_files import PemFileError, check_key_pair, load_certificates
from aibridgeproxyd.policy import Policy, PolicyError, validate_policy
from aibridgeproxyd.pricing import ModelPrices, parse_rate
from aibridgeproxyd.upstream_proxy import NoProxy, UpstreamProxy, parse_upstream_proxy

ENV_PREFIX = "AIBRIDGEPROXYD_"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid. The message names the key."""


@dataclass(frozen=True)
class HostPort:
    """A listen address; printed as ``host:port`` (``[host]:port`` for IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class Config:
    """Every configuration key, parsed and validated by ``load_config`` (README.md#configuration);
    the defaults here are the documented ones."""

    listen: HostPort = HostPort("127.0.0.1", 8888)
    admin_listen: HostPort = HostPort("127.0.0.1", 8889)
    data_dir: Path = Path("./data")
    # The store (CONTRACT 14): None is the SQLite file <data_dir>/aibridgeproxyd.db.
    database_url: DatabaseUrl | None = None
    ca_cert_file: Path | None = None
    ca_key_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # The admin listener (API, dashboard, metrics) over TLS when both are set.
    admin_tls_cert_file: Path | None = None
    admin_tls_key_file: Path | None = None
    # Secrets at rest (CONTRACT section 13): base64 32-byte AES-256-GCM keys; the first
    # encrypts, the others only decrypt. Empty: a key generated into <data_dir>/encryption.key.
    encryption_keys: tuple[str, ...] = ()
    allowed_ports: tuple[int, ...] = (80, 443)
    allowed_private_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    upstream_proxy: UpstreamProxy | None = None
    upstream_proxy_ca: Path | None = None
    upstream_no_proxy: NoProxy = field(default_factory=lambda: NoProxy(()))
    upstream_ca_file: Path | None = None
    auth: str = "token"
    auth_tunneled: bool = False
    central_key_placeholder: str = "aibridgeproxyd"
    # Failed proxy authentications (malformed or unknown credentials) one source address may make
    # within auth_failure_window before it is refused for auth_failure_cooldown.
    auth_failure_limit: int = 20
    auth_failure_window: float = 60.0
    auth_failure_cooldown: float = 60.0
    # Failed authentications are logged at most once per source address per this interval.
    auth_failure_log_interval: float = 10.0
    reload_interval: float = 10.0
    metrics_prefix: str = "coder_aibridgeproxyd_"
    retention: float = 60 * 86400.0
    tracing: str = "none"
    otlp_endpoint: str = "http://127.0.0.1:4318"
    log_format: str = "text"
    log_level: str = "info"
    drain_timeout: float = 30.0
    # Proxy processes serving `listen` (aibridgeproxyd.workers); 1 is the single process.
    workers: int = 1
    # Largest request body the proxy reads from a client (declared or counted as it arrives):
    # coding agents send megabytes of context, so the default is generous.
    max_request_body: int = 64 * 1024 * 1024
    # Largest request head (request line plus headers; HTTP/2: decoded header list).
    max_request_head: int = 64 * 1024
    # Concurrent client connections; more are refused as they arrive.
    max_connections: int = 4096
    # Concurrent client connections from one source address: a quarter of max_connections, so
    # one address cannot lock everyone out, and a NATed office of hundreds of developers fits.
    max_connections_per_address: int = 1024
    # Relay tunnels with zero-copy splice(2) where Linux offers it (mitm/splice_relay.py);
    # false: always the copying relay.
    tunnel_splice: bool = True
    # Process-wide budget for buffered request bodies and HTTP/2 response bytes not yet sent;
    # a request body that would cross it gets 503 (retryable) instead of being buffered.
    max_buffered_bytes: int = 1024 * 1024 * 1024
    # A request head must be complete this long after the connection opened, the CONNECT was
    # answered, or (HTTP/1.1 keep-alive) the previous response ended.
    request_head_timeout: float = 30.0
    # An HTTP/2 connection with no stream open, or a tunnel with no bytes either way.
    idle_timeout: float = 300.0
    # An HTTP/2 stream whose client stops reading for this long is cancelled upstream.
    stream_stall_timeout: float = 60.0
    # Streams of one client connection (aibridgeproxyd.mitm.stream_bounds): HTTP/2 concurrency and
    # reset budget (rapid reset), WebSocket message size, upstream response and idle time.
    # Non-streaming reasoning requests can take many minutes before their first byte.
    http2_max_concurrent_streams: int = 100
    http2_max_resets: int = 200
    http2_reset_window: float = 10.0
    max_websocket_message: int = 16 * 1024 * 1024
    upstream_connect_timeout: float = 30.0
    upstream_response_timeout: float = 600.0
    upstream_idle_timeout: float = 300.0
    providers: tuple[Mapping[str, Any], ...] = field(default=())
    # Per-model price overrides, USD per million tokens (aibridgeproxyd.pricing).
    prices: Mapping[str, ModelPrices] = field(default_factory=dict)
    # One-time seed of policies (docs/policies.md#configuration-seed), validated at load.
    policies: tuple[Policy, ...] = field(default=())
    # What an interception keeps besides usage (docs/monitoring.md#interception-records): the
    # last user prompt, the response's tool calls, the model's thoughts; each cut at
    # record_max_bytes (UTF-8 bytes).
    record_prompts: bool = True
    record_tool_calls: bool = True
    record_thoughts: bool = True
    record_max_bytes: int = 32 * 1024
    # Structured interception records in the log, and log lines as span events.
    log_interceptions: bool = False
    trace_logs: bool = False
    # Where the generated CA lives when ca_cert_file/ca_key_file are not given.
    certs_dir: Path = Path("./certs")

    @property
    def database(self) -> DatabaseUrl:
        """The store this configuration names: ``database_url``, else the SQLite file in
        ``data_dir``."""
        return self.database_url or DatabaseUrl.sqlite(self.data_dir / "aibridgeproxyd.db")

    @property
    def database_path(self) -> Path:
        """The SQLite file (the default one in ``data_dir`` for a PostgreSQL store, which
        does not use it)."""
        return self.database.path or self.data_dir / "aibridgeproxyd.db"


# --- value parsers: each takes the raw value and returns the typed one, or raises ValueError ---

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = 3650 * 86400.0  # seconds


def parse_duration(value: Any) -> float:
    """``10s``, ``5m``, ``1.5h``, ``60d`` or ``250ms`` as seconds. The unit is required: a bare
    number is refused, because ``retention: 60`` could mean seconds or days
    (README.md#configuration). Raises ``ValueError`` naming the value."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 10s, got {value!r}")
    match = _DURATION.match(str(value))
    if not match:
        if isinstance(value, int | float) or re.fullmatch(r"\s*\d+(\.\d+)?\s*", str(value)):
            raise ValueError(
                f"a duration needs a unit (ms, s, m, h or d), e.g. '{value}s': got {value!r}"
            )
        raise ValueError(f"expected a duration like 10s, 5m, 1h or 60d, got {value!r}")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds > MAX_DURATION:
        # Timers take seconds as floats; an astronomically long one is a typo, not a wish.
        raise ValueError(f"duration must be at most 3650d, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be positive and finite, got {value!r}")
    return seconds


_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}  # fmt: skip


def parse_size(value: Any) -> int:
    """``64MiB``, ``512k``, ``1g`` or a number of bytes (binary units throughout)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 64MiB, got {value!r}")
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"expected a size like 64MiB, 512k or a number of bytes, got {value!r}")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower() if match.group(2) else None]
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def parse_count(value: Any, maximum: int = 2**31 - 1) -> int:
    """A positive whole number (``100``) up to ``maximum``, from YAML or the environment."""
    if isinstance(value, bool) or not re.fullmatch(r"\s*\d+\s*", str(value)):
        raise ValueError(f"expected a positive whole number, got {value!r}")
    count = int(value)
    if not 0 < count <= maximum:
        raise ValueError(f"must be between 1 and {maximum}, got {value!r}")
    return count


MAX_WORKERS = 64


def parse_workers(value: Any, cores: Callable[[], int | None] = os.cpu_count) -> int:
    """``workers``: a whole number from 1 to ``MAX_WORKERS``, or ``auto`` for the number of
    cores (``os.cpu_count()``, at most ``MAX_WORKERS``; 1 when unknown)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, min(cores() or 1, MAX_WORKERS))
    try:
        return parse_count(value, MAX_WORKERS)
    except ValueError:
        raise ValueError(
            f"expected auto or a whole number from 1 to {MAX_WORKERS}, got {value!r}"
        ) from None


def parse_host_port(value: Any) -> HostPort:
    text = str(value).strip()
    match = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", text) or re.match(
        r"^([^:\[\]]+):(\d+)$", text
    )
    if not match:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    port = int(match.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return HostPort(match.group(1), port)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _as_list(value: Any) -> list[Any]:
    """YAML gives lists; the environment gives comma-separated strings."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    raise ValueError(f"expected a list, got {value!r}")


def parse_ports(value: Any) -> tuple[int, ...]:
    ports = []
    for item in _as_list(value):
        try:
            port = int(item)
        except (TypeError, ValueError):
            raise ValueError(f"not a port number: {item!r}") from None
        if isinstance(item, bool) or not 1 <= port <= 65535:
            raise ValueError(f"port out of range: {item!r}")
        ports.append(port)
    return tuple(sorted(set(ports)))


def parse_cidrs(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDR networks (``10.0.0.0/8``, ``fd00::/8``, a bare address for one host). A network
    with host bits set (``10.0.0.1/8``) is refused, naming the network it probably meant and
    the one-address form: silently widening or narrowing an allow-list is a security bug."""
    networks = []
    for item in _as_list(value):
        try:
            loose = ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            raise ValueError(f"invalid CIDR {item!r}") from None
        try:
            networks.append(ipaddress.ip_network(str(item)))
        except ValueError:
            address = str(item).partition("/")[0]
            single = f"{address}/{loose.max_prefixlen}"
            raise ValueError(
                f"CIDR {item!r} has host bits set: write {str(loose)!r} for the network, "
                f"or {single!r} for that one address"
            ) from None
    return tuple(networks)


def parse_path(value: Any) -> Path | None:
    """A file or directory path; ``~`` is expanded. Empty means unset."""
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise ValueError(f"expected a path, got {value!r}")
    if str(value).strip() == "":
        return None
    try:
        return Path(value).expanduser()
    except RuntimeError:  # `~user` of a user this machine does not know
        raise ValueError(f"cannot expand the home directory in {str(value)!r}") from None


def parse_proxy_url(value: Any) -> UpstreamProxy | None:
    """The upstream proxy URL as a value; errors never contain its credentials."""
    if value is None or str(value).strip() == "":
        return None
    return parse_upstream_proxy(str(value))


def parse_no_proxy(value: Any) -> NoProxy:
    """``upstream_no_proxy`` entries (a list, or comma-separated in the environment)."""
    return NoProxy(str(item) for item in _as_list(value))


def parse_http_url(value: Any) -> str:
    text = str(value).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    return text


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def parse_nonempty_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    text = value
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def parse_providers(value: Any) -> tuple[Mapping[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("expected a list of provider objects")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"entry {index} is not a mapping")
    return tuple(value)


_POLICY_KEYS = (
    "user", "provider", "max_cost_usd", "max_tokens", "period", "models", "rpm", "tpm",
    "max_parallel",
)  # fmt: skip


def parse_policies(value: Any) -> tuple[Policy, ...]:
    """``policies:``: a list of policy objects (``aibridgeproxyd.policy.Policy`` fields; no
    ``user`` = the default, no ``provider`` = every provider). Errors name the entry and the
    field; two entries for the same user and provider are refused."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("expected a list of policy objects")
    policies: dict[tuple[str, str], Policy] = {}
    for index, entry in enumerate(value):
        policy = _config_policy(index, entry)
        if policy.key in policies:
            raise ValueError(f"entry {index}: a second policy for the same user and provider")
        policies[policy.key] = policy
    return tuple(policies.values())


def _config_policy(index: int, entry: Any) -> Policy:
    if not isinstance(entry, dict):
        raise ValueError(f"entry {index} is not a mapping")
    unknown = sorted(str(key) for key in entry if key not in _POLICY_KEYS)
    if unknown:
        raise ValueError(
            f"entry {index}: unknown field {unknown[0]!r}; valid: {', '.join(_POLICY_KEYS)}"
        )
    fields = dict(entry)
    if isinstance(fields.get("models"), list):
        fields["models"] = tuple(fields["models"])
    try:
        return validate_policy(Policy(**fields))
    except PolicyError as exc:
        raise ValueError(f"entry {index}: {exc.field}: {exc}") from None


_PRICE_RATES = ("input", "output", "cache_read", "cache_creation")


def parse_model_prices(value: Any) -> ModelPrices:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of {', '.join(_PRICE_RATES)} rates, got {value!r}")
    unknown = sorted(str(key) for key in value if key not in _PRICE_RATES)
    if unknown:
        raise ValueError(f"unknown rate {unknown[0]!r}; valid: {', '.join(_PRICE_RATES)}")
    rates: dict[str, Decimal] = {}
    for key in _PRICE_RATES:
        if key in value:
            try:
                rates[key] = parse_rate(value[key])
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        elif key in ("input", "output"):
            raise ValueError(f"missing rate {key!r}")
    return ModelPrices(**rates)


def parse_prices(value: Any) -> Mapping[str, ModelPrices]:
    """``prices:``: model name -> rates (``input``, ``output`` required; ``cache_read``,
    ``cache_creation`` optional, else the input rate). Errors name the model and the rate."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of model names to rates")
    prices: dict[str, ModelPrices] = {}
    for model, rates in value.items():
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model name {model!r} is not a non-empty string")
        try:
            prices[model] = parse_model_prices(rates)
        except ValueError as exc:
            raise ValueError(f"model {model!r}: {exc}") from None
    return prices


def parse_encryption_keys(value: Any) -> tuple[str, ...]:
    """``encryption_keys``: a YAML list, or comma-separated text (the environment variable), of
    base64 keys of 32 bytes each. The keys are checked here (length, base64) but never echoed:
    a message names a key by its position only."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("expected a list of base64 keys (or comma-separated text)")
    keys: list[str] = []
    for position, item in enumerate(items, start=1):
        text = item.strip() if isinstance(item, str) else None
        try:
            raw = base64.b64decode(text or "", validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"key #{position} is not the base64 text of 32 bytes")
        keys.append(text or "")
    return tuple(keys)


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "listen": parse_host_port,
    "admin_listen": parse_host_port,
    "data_dir": lambda v: parse_path(v) or Path("./data"),
    "database_url": parse_database_url,
    "ca_cert_file": parse_path,
    "ca_key_file": parse_path,
    "tls_cert_file": parse_path,
    "tls_key_file": parse_path,
    "admin_tls_cert_file": parse_path,
    "admin_tls_key_file": parse_path,
    "encryption_keys": lambda v: parse_encryption_keys(v),
    "allowed_ports": parse_ports,
    "allowed_private_cidrs": parse_cidrs,
    "upstream_proxy": parse_proxy_url,
    "upstream_proxy_ca": parse_path,
    "upstream_no_proxy": parse_no_proxy,
    "upstream_ca_file": parse_path,
    "auth": _choice("token", "none"),
    "auth_tunneled": parse_bool,
    "central_key_placeholder": parse_nonempty_str,
    "auth_failure_limit": lambda v: parse_count(v),
    "auth_failure_window": parse_duration,
    "auth_failure_cooldown": parse_duration,
    "auth_failure_log_interval": parse_duration,
    "reload_interval": parse_duration,
    "metrics_prefix": lambda v: _metric_prefix(v),
    "retention": parse_duration,
    "tracing": _choice("none", "console", "otlp"),
    "otlp_endpoint": parse_http_url,
    "log_format": _choice("text", "json"),
    "log_level": _choice("debug", "info", "warning", "error"),
    "drain_timeout": parse_duration,
    "workers": lambda v: parse_workers(v),
    "max_request_body": lambda v: parse_size(v),
    "max_request_head": lambda v: parse_size(v),
    "max_connections": lambda v: parse_count(v),
    "max_connections_per_address": lambda v: parse_count(v),
    "tunnel_splice": parse_bool,
    "max_buffered_bytes": lambda v: parse_size(v),
    "request_head_timeout": parse_duration,
    "idle_timeout": parse_duration,
    "stream_stall_timeout": parse_duration,
    "http2_max_concurrent_streams": parse_count,
    "http2_max_resets": parse_count,
    "http2_reset_window": parse_duration,
    "max_websocket_message": parse_size,
    "upstream_connect_timeout": parse_duration,
    "upstream_response_timeout": parse_duration,
    "upstream_idle_timeout": parse_duration,
    "providers": parse_providers,
    "prices": parse_prices,
    "policies": lambda v: parse_policies(v),
    "record_prompts": parse_bool,
    "record_tool_calls": parse_bool,
    "record_thoughts": parse_bool,
    "record_max_bytes": lambda v: _record_max_bytes(v),
    "log_interceptions": parse_bool,
    "trace_logs": parse_bool,
    "certs_dir": lambda v: parse_path(v) or Path("./certs"),
}

assert set(_PARSERS) == {f.name for f in fields(Config)}

# Keys that only make sense in YAML (a list of objects); the environment has its own seed syntax.
_YAML_ONLY = {"providers", "prices", "policies"}


# Each prompt, tool input and thought is held in memory while a request runs, several per
# response: a cut beyond this is no longer a cut.
MAX_RECORD_BYTES = 1024 * 1024


def _record_max_bytes(value: Any) -> int:
    size = parse_size(value)
    if size > MAX_RECORD_BYTES:
        raise ValueError(f"must be at most 1MiB, got {value!r}")
    return size


def _metric_prefix(value: Any) -> str:
    text = str(value)
    if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        raise ValueError(f"not a valid Prometheus metric name prefix: {value!r}")
    return text


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` keeps the last of two equal keys without a word; a key written twice
    is refused instead (at any depth), so neither value is silently ignored."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error as one short phrase with its line and column (its own text quotes the
    offending line under a caret, over several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        # The file is named once, up front; PyYAML's own name for a string is noise.
        return " ".join(str(exc).replace(' in "<unicode string>",', " at").split())
    context = getattr(exc, "context", None)
    prefix = f"{context}: " if context else ""
    return f"{prefix}{problem} (line {mark.line + 1}, column {mark.column + 1})"


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} "
            f"at offset {exc.start}"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping of keys to values")
    return data


def load_config(
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge defaults, the YAML file, the environment and flags, then validate every value."""
    environ = os.environ if environ is None else environ
    raw: dict[str, tuple[Any, str]] = {}

    if config_file is not None:
        for key, value in load_yaml(config_file).items():
            if key not in _PARSERS:
                raise ConfigError(f"unknown config key {key!r} in {config_file}")
            raw[key] = (value, f"{config_file}: {key}")

    raw.update(_environment_values(environ))

    for key, value in (flags or {}).items():
        if key not in _PARSERS:
            raise ConfigError(f"unknown config key {key!r}")
        if value is not None:
            raw[key] = (value, f"--{key.replace('_', '-')}")

    values: dict[str, Any] = {}
    for key, (value, source) in raw.items():
        try:
            values[key] = _PARSERS[key](value)
        except ValueError as exc:
            raise ConfigError(f"invalid value for config key {key!r} ({source}): {exc}") from None

    config = Config(**values)
    # Absolute from here on: every message and every CLI output names the real place, whatever
    # directory a later step runs in.
    config = replace(
        config, data_dir=config.data_dir.absolute(), certs_dir=config.certs_dir.absolute()
    )
    if config.database_url is not None and config.database_url.path is not None:
        config = replace(
            config, database_url=DatabaseUrl.sqlite(config.database_url.path.absolute())
        )
    _check_combinations(config)
    _check_files(config, {key: source for key, (_, source) in raw.items()})
    return config


def _environment_values(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``AIBRIDGEPROXYD_<KEY>`` variables by config key. A variable with our prefix whose key is
    unknown refuses to start like an unknown YAML key: a typo must not fall back to a default."""
    values: dict[str, tuple[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in _YAML_ONLY:
            raise ConfigError(
                f"environment variable {name}: config key {key!r} can only be set in the YAML file"
            )
        if key in _PARSERS and name != ENV_PREFIX + key.upper():
            raise ConfigError(
                f"environment variable {name}: write it in upper case, {ENV_PREFIX}{key.upper()}"
            )
        if key not in _PARSERS:
            raise ConfigError(
                f"unknown environment variable {name}: no config key {key!r} "
                f"(variables named {ENV_PREFIX}* are configuration)"
            )
        values[key] = (value, name)
    return values


def _check_combinations(config: Config) -> None:
    if (config.ca_cert_file is None) != (config.ca_key_file is None):
        raise ConfigError("config keys 'ca_cert_file' and 'ca_key_file' must be set together")
    for cert_key, key_key in (
        ("tls_cert_file", "tls_key_file"),
        ("admin_tls_cert_file", "admin_tls_key_file"),
    ):
        if (getattr(config, cert_key) is None) != (getattr(config, key_key) is None):
            raise ConfigError(f"config keys {cert_key!r} and {key_key!r} must be set together")
    if config.auth == "none" and not config.listen.is_loopback:
        raise ConfigError(
            f"config key 'auth': 'none' is only allowed when 'listen' is a loopback address, "
            f"got listen {config.listen}"
        )
    if not config.allowed_ports:
        raise ConfigError("config key 'allowed_ports' must list at least one port")
    if config.upstream_proxy_ca is not None and config.upstream_proxy is None:
        raise ConfigError("config key 'upstream_proxy_ca' is set but 'upstream_proxy' is not")
    if config.database.is_postgres and not config.encryption_keys:
        # A key file generated on one machine would leave every other replica unable to read
        # the provider keys and the shared CA: the keys must come from the configuration.
        raise ConfigError(
            "config key 'encryption_keys' must be set when 'database_url' is PostgreSQL: every "
            'replica needs the same keys (generate one with: python3 -c "import base64, os; '
            'print(base64.b64encode(os.urandom(32)).decode())")'
        )
    if config.trace_logs and config.tracing == "none":
        raise ConfigError(
            "config key 'trace_logs' is true but 'tracing' is none: there is no span to attach "
            "log lines to (set tracing: console or otlp)"
        )


def _check_files(config: Config, sources: Mapping[str, str]) -> None:
    """Read and parse every PEM file the configuration names, so a bad file fails the loader
    (and so every CLI command) with one line, not the daemon half-way through its start."""

    try:
        for cert_key, key_key in (
            ("tls_cert_file", "tls_key_file"),
            ("admin_tls_cert_file", "admin_tls_key_file"),
            ("ca_cert_file", "ca_key_file"),
        ):
            cert_path, key_path = getattr(config, cert_key), getattr(config, key_key)
            if cert_path is not None and key_path is not None:
                check_key_pair(cert_path, cert_key, key_path, key_key)
        for key in ("upstream_ca_file", "upstream_proxy_ca"):
            path = getattr(config, key)
            if path is not None:
                load_certificates(path, key)
    except PemFileError as exc:
        source = sources.get(exc.key)
        where = f" ({source})" if source else ""
        raise ConfigError(
            f"invalid value for config key {exc.key!r}{where}: {exc.reason}"
        ) from None
