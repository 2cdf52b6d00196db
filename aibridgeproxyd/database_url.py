"""``database_url``: which store the daemon and the CLI use (CONTRACT section 14).

``sqlite:///<path>`` names a SQLite file (a relative path after the three slashes, or an absolute
one with four: ``sqlite:////var/lib/aibridgeproxyd/aibridgeproxyd.db``); the default is
``<data_dir>/aibridgeproxyd.db``. ``postgresql://user:password@host:port/db`` (or
``postgres://``, with libpq query parameters such as ``sslmode``) names a PostgreSQL database
that several replicas share. The password is never printed: ``redacted`` replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

Engine = Literal["sqlite", "postgresql"]

_POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class DatabaseUrl:
    """A parsed ``database_url``: ``engine`` is ``sqlite`` (``path`` set) or ``postgresql``
    (``dsn`` set: the URL as given, password included, for the driver only)."""

    engine: Engine
    path: Path | None = None
    dsn: str = ""

    @classmethod
    def sqlite(cls, path: Path) -> DatabaseUrl:
        return cls("sqlite", path=path)

    @property
    def is_postgres(self) -> bool:
        return self.engine == "postgresql"

    def redacted(self) -> str:
        """The URL for logs and messages: a PostgreSQL password is replaced by ``***``."""
        if self.path is not None:
            return str(self.path)
        parts = urlsplit(self.dsn)
        if parts.password is None:
            return self.dsn
        host = parts.netloc.rsplit("@", 1)[1]
        netloc = f"{parts.username or ''}:***@{host}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def __str__(self) -> str:
        return self.redacted()


def parse_database_url(value: Any) -> DatabaseUrl | None:
    """The ``database_url`` key: None (the default file in ``data_dir``), a ``sqlite:///`` URL
    or a ``postgresql://`` one. ``ValueError`` names what is wrong, never the password."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("expected a URL: sqlite:///<path> or postgresql://user@host:port/db")
    text = value.strip()
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme == "sqlite":
        return _sqlite_url(text)
    if scheme in _POSTGRES_SCHEMES:
        return _postgres_url(text)
    raise ValueError(
        f"unsupported scheme {scheme!r}: use sqlite:///<path> or postgresql://user@host:port/db"
        if scheme
        else "expected a URL: sqlite:///<path> or postgresql://user@host:port/db"
    )


def _sqlite_url(text: str) -> DatabaseUrl:
    if not text.lower().startswith("sqlite:///") or len(text) <= len("sqlite:///"):
        raise ValueError("a SQLite URL is sqlite:///<path> (four slashes for an absolute path)")
    path = unquote(text[len("sqlite:///") :])
    if "\x00" in path or "?" in path:
        raise ValueError("a SQLite URL names a file path only (no NUL, no query parameters)")
    return DatabaseUrl.sqlite(Path(path))


def _postgres_url(text: str) -> DatabaseUrl:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        # urlsplit's messages quote the port, never the password.
        raise ValueError(f"not a valid PostgreSQL URL: {exc}") from None
    if not parts.hostname:
        raise ValueError("a PostgreSQL URL needs a host: postgresql://user@host:port/db")
    if port == 0:
        raise ValueError("a PostgreSQL URL's port must be 1-65535")
    if not parts.path.strip("/"):
        raise ValueError("a PostgreSQL URL needs a database name: postgresql://user@host:port/db")
    if any(ord(c) < 0x20 for c in text):
        raise ValueError("a PostgreSQL URL must not contain control characters")
    return DatabaseUrl("postgresql", dsn=text)
