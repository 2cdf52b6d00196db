"""Local fakes for end-to-end tests: a provider upstream and a tunnel target, both over TLS."""

from .tls import RecordedRequest, TlsIdentity, TunnelTarget, issued_by
from .upstream import (
    CACHE_CREATION_INPUT_TOKENS,
    CACHED_INPUT_TOKENS,
    HEADER_DELAY_MS,
    HEADER_DROP_AFTER,
    HEADER_EVENTS,
    HEADER_GATE,
    HEADER_RESPONSE_DELAY_MS,
    HEADER_RETRY_AFTER,
    HEADER_STATUS,
    HEADER_STREAM_ID,
    INPUT_TOKENS,
    FakeUpstream,
    StreamState,
    presented_key,
    reply_text,
    text_deltas,
)

__all__ = [
    "CACHED_INPUT_TOKENS",
    "CACHE_CREATION_INPUT_TOKENS",
    "HEADER_DELAY_MS",
    "HEADER_DROP_AFTER",
    "HEADER_EVENTS",
    "HEADER_GATE",
    "HEADER_RESPONSE_DELAY_MS",
    "HEADER_RETRY_AFTER",
    "HEADER_STATUS",
    "HEADER_STREAM_ID",
    "INPUT_TOKENS",
    "FakeUpstream",
    "RecordedRequest",
    "StreamState",
    "TlsIdentity",
    "TunnelTarget",
    "issued_by",
    "presented_key",
    "reply_text",
    "text_deltas",
]
