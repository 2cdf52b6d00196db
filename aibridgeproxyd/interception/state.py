"""Per-connection and per-request state that the addons hand to each other.

A CONNECT is classified once; the caller's identity stays attached to the client connection, so
every request inside the tunnel knows who sent it. Entries die with their mitmproxy ``Client``.
"""

from __future__ import annotations

import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mitmproxy import connection, http

from aibridgeproxyd.adapters import Adapter
from aibridgeproxyd.adapters.base import ResponseTransform
from aibridgeproxyd.credentials import CredentialMode
from aibridgeproxyd.errors import REQUEST_ID_HEADER
from aibridgeproxyd.model import Provider
from aibridgeproxyd.response_content import ContentTap
from aibridgeproxyd.usage import ApiKind, Usage, UsageTap

METADATA_KEY = "aibridgeproxyd"


class ResponseStreams(Protocol):
    """What the stall watch (``addons/stalls.py``) needs of a MITM'd connection's HTTP layer
    (``mitm.http_layer.AIBridgeHttpLayer``), so this module holds no mitmproxy layer type."""

    def unread_response_streams(self) -> list[tuple[int, http.HTTPFlow]]:
        """``(stream id, flow)`` of each stream whose response the client is not reading."""
        ...


@dataclass
class ConnectInfo:
    """One client connection that made a CONNECT: where it asked to go, what Classify decided
    (MITM or tunnel, the claiming provider), and who it authenticated as. Created by
    ``addons/classify.py``; completed by ``addons/proxy_auth.py`` and ``addons/intercept.py``."""

    host: str
    port: int
    connect_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    intercept: bool = False  # MITM'd (a provider claimed the host at CONNECT time)
    provider_name: str | None = None
    # The claiming provider's type, so that a request on a tunnel whose provider is gone can
    # still be answered in the client format (addons/route.py).
    provider_type: str | None = None
    identity: str | None = None  # the proxy token's name: the interception's initiator
    # Held in memory only, so a request that echoes it as an API key is recognised and stripped.
    proxy_token: str | None = None
    established: bool = False
    # The HTTP layer of a MITM'd connection, for the stall watch to inspect its streams.
    http_layer: ResponseStreams | None = None


class ConnectionTable:
    """The ``ConnectInfo`` of each live client connection, keyed weakly by mitmproxy's
    ``Client``: an entry goes when its connection does, with no clean-up hook to forget."""

    def __init__(self) -> None:
        self._by_client: weakref.WeakKeyDictionary[connection.Client, ConnectInfo] = (
            weakref.WeakKeyDictionary()
        )

    def add(self, client: connection.Client, info: ConnectInfo) -> None:
        self._by_client[client] = info

    def get(self, client: connection.Client) -> ConnectInfo | None:
        return self._by_client.get(client)

    def is_proxy_request(self, flow: http.HTTPFlow) -> bool:
        """A plain-HTTP proxy request (absolute-form, not inside a CONNECT tunnel).

        ``first_line_format`` cannot tell: HTTP/2 requests inside a tunnel carry an authority
        too. A request is inside a tunnel exactly when its connection made a CONNECT."""
        return flow.client_conn not in self._by_client

    def items(self) -> list[tuple[connection.Client, ConnectInfo]]:
        return list(self._by_client.items())

    def __len__(self) -> int:
        return len(self._by_client)


@dataclass
class RoutingState:
    """How the request goes upstream. Written only by ``addons/route.py`` (through
    ``interception.routing``); read by tracing."""

    credential_mode: CredentialMode | None = None  # None until the request is routed
    # BYOK: the client's own key, masked (``credentials.mask_secret``); the secret is never kept.
    byok_hint: str | None = None
    # Key failover (central mode): the index into ``provider.keys`` of the key in use, every
    # index tried for this request, and what the tries met.
    key_index: int | None = None
    tried_keys: set[int] = field(default_factory=set)
    saw_rate_limit: bool = False  # some key answered 429: exhaustion then answers 429, not 502
    keys_exhausted: bool = False  # the last key failed; ``response`` replaces the answer

    def use_key(self, index: int) -> None:
        """Send the request with central key ``index`` (never tried before for this request)."""
        self.key_index = index
        self.tried_keys.add(index)


@dataclass
class RecordingState:
    """What the interception record is assembled from. Written by ``addons/interceptions.py``
    (through ``interception.recording``); ``request_model`` only by
    ``recording.read_request_model``, on the head (``addons/interceptions.py``) and before the
    adapter's rewrite (``routing.route_request``); the request's content (prompt, tool-result
    ids, a body's session) likewise by ``recording.read_request_content`` before the rewrite.
    Read by tracing."""

    api_kind: ApiKind | None = None  # None: no usage is read from the response
    client: str = "Unknown"
    user_agent: str | None = None  # at most ``recording.USER_AGENT_LIMIT`` characters
    method: str = ""
    path: str = ""  # as the client sent it, before the adapter's rewrite, without the query
    request_model: str | None = None
    sent_upstream: float | None = None  # epoch seconds: the request, read whole, left upstream
    ttfb: float | None = None  # seconds from ``sent_upstream`` to the upstream's headers
    usage_tap: UsageTap | None = None  # on a streamed 2xx answer
    # What reads each chunk of that answer after it went to the client (``tap_usage``), and
    # what hands the taps the chunks it still holds: called before their results are read.
    chunk_tap: Callable[[bytes], None] | None = None
    flush_taps: Callable[[], None] | None = None
    # Tool calls and thoughts: on a streamed 2xx answer, or a WebSocket session's messages.
    content_tap: ContentTap | None = None
    usage: Usage | None = None  # a WebSocket session's running sum, then the final usage
    recorded: bool = False
    submitted_at: float | None = None  # epoch seconds the record went to the writer's queue
    dropped: bool = False  # the writer's queue refused the record
    # Read from the whole request before the adapter's rewrite (``recording.read_request_content``;
    # the session's header on the head, ``recording.read_client_session``). ``prompt_max_bytes``
    # is the cut of the prompt, None when prompts are not recorded (``record_prompts: false``).
    prompt_max_bytes: int | None = None
    # The credentials the client sent, before routing removed them (central or signed mode):
    # kept for redacting recorded text and logs only; never recorded or logged.
    client_credentials: tuple[str, ...] = ()
    prompt: str | None = None
    tool_result_ids: tuple[str, ...] = ()
    # The client's own session id (``InterceptionRecord.client_session_id``); the
    # ``interception_start`` log record carries it when known.
    client_session_id: str | None = None


@dataclass
class RequestContext:
    """Attached to a MITM'd flow that an adapter routes, in ``flow.metadata[METADATA_KEY]``.

    Who writes what:

    - identity (``request_id``, ``connect``, ``provider``, ``adapter``, ``started``): set once by
      ``addons/route.py`` at ``requestheaders``; read by every later addon;
    - ``routing``: ``addons/route.py`` (credential mode, key failover);
    - ``transform``: ``addons/route.py``, from the adapter's rewrite; ``addons/streaming.py``
      applies it to the response;
    - ``recording``: ``addons/interceptions.py``, through ``interception.recording``; its
      ``request_model`` is read by ``recording.read_request_model`` alone, called on the head
      by ``addons/interceptions.py`` and before the rewrite by ``routing.route_request`` (see
      ``RecordingState``);
    - ``proxy_answer_code``: whoever answers the request itself (``mark_proxy_answer``).
    """

    request_id: str
    connect: ConnectInfo
    provider: Provider
    adapter: Adapter
    started: float = field(default_factory=time.time)  # epoch seconds
    routing: RoutingState = field(default_factory=RoutingState)
    transform: ResponseTransform | None = None
    recording: RecordingState = field(default_factory=RecordingState)
    # The code of an answer the proxy made itself (``byok_not_allowed``, ``upstream_unreachable``,
    # ...): set by whoever makes it (``mark_proxy_answer``). Such a flow is recorded with that
    # code as its error and no TTFB, and is never logged or measured as an upstream answer.
    proxy_answer_code: str | None = None

    def log_ids(self) -> dict[str, str]:
        """The ``extra`` of a log line about this request: connect_id, request_id, provider,
        and the initiator (the proxy token's name) when there is one."""
        ids = {
            "connect_id": self.connect.connect_id,
            "request_id": self.request_id,
            "provider": self.provider.name,
        }
        if self.connect.identity:
            ids["initiator"] = self.connect.identity
        return ids


def stamp_request_id(response: http.Response, ctx: RequestContext) -> None:
    """Give an answer on a routed request the ``X-AIBridge-Request-Id`` header, the id its
    interception record and log lines carry (docs/monitoring.md#interception-records): every
    answer, the upstream's and the proxy's own, is stamped through here."""
    response.headers[REQUEST_ID_HEADER] = ctx.request_id


def request_context(flow: http.HTTPFlow) -> RequestContext | None:
    """The flow's context; None on a flow no adapter routes (tunnels, plain HTTP, CONNECT)."""
    return flow.metadata.get(METADATA_KEY)


def mark_proxy_answer(flow: http.HTTPFlow, code: str) -> None:
    """Mark the flow's response as the proxy's own answer, with its stable reason code. Call it
    wherever the proxy answers a MITM'd request itself instead of the upstream."""
    ctx = request_context(flow)
    if ctx is not None:
        ctx.proxy_answer_code = code
