"""Fixtures the end-to-end modules share: local fakes a daemon routes or tunnels to, and a proxy
token for the module's daemon.

Each fake lives for one test module (starting one takes a TLS identity and a server thread).
A module that needs a clean fake for every test asks for ``clean_upstream`` (usually through
``pytestmark = pytest.mark.usefixtures("clean_upstream")``). Each module still builds its own
``daemon``, because its configuration is what that module is about.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.tls import TunnelTarget
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess
from tests.postgres import postgres_server, postgres_url  # noqa: F401  (fixtures)
from tests.store_engines import db_path, engine, store_database  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    """The fake OpenAI/Anthropic upstream (``base_url`` ends in /v1, ``origin`` does not)."""
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def clean_upstream(upstream: FakeUpstream) -> None:
    """Forget the upstream's requests, streams and forced failures before the test."""
    upstream.reset()


@pytest.fixture(scope="module")
def target() -> Iterator[TunnelTarget]:
    """An HTTPS server no provider claims: what a tunneled CONNECT reaches."""
    with TunnelTarget() as tunnel_target:
        yield tunnel_target


@pytest.fixture(scope="module")
def plain_target() -> Iterator[TunnelTarget]:
    """A plain-HTTP server no provider claims, for absolute-form requests and plain tunnels."""
    with TunnelTarget(tls=False) as tunnel_target:
        yield tunnel_target


@pytest.fixture(scope="module")
def token_name() -> str:
    """Whose proxy token ``token`` is; a module overrides it to name another user."""
    return "alice"


@pytest.fixture(scope="module")
def token(daemon: DaemonProcess, token_name: str) -> str:
    """A proxy token for the module's ``daemon``, usable as soon as the test starts."""
    return daemon.create_token(token_name)
