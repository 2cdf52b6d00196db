"""Fuzzing (hypothesis) of every parser that sees client or upstream bytes
(docs/security.md#fuzzing).

Each parser has a defined way to say "bad input" (``None``, ``ConfigError``, an error event, a
``problem``); any other exception is a failure, because in a hook it would be an unchecked
path. Example counts are moderate so the suite stays fast.
"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from aibridgeproxyd.addons.streaming import should_stream
from botocore.eventstream import EventStreamBuffer
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.net import encoding as mitmproxy_encoding
from mitmproxy.net.http.http1 import read_request_head
from mitmproxy.test import tflow

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.adapters.base import scanned_body_model
from aibridgeproxyd.adapters.bedrock import EventStreamToSse
from aibridgeproxyd.clients import classify_client
from aibridgeproxyd.config import _PARSERS, ConfigError, load_config, parse_duration
from aibridgeproxyd.content_coding import UndecodableBody, decode_bounded
from aibridgeproxyd.credentials import (
    credential_mode,
    credential_values,
    remove_all_credentials,
    remove_proxy_credentials,
)
from aibridgeproxyd.destinations import DestinationPolicy, literal_ip, normalize_address
from aibridgeproxyd.keypool import parse_retry_after
from aibridgeproxyd.proxy_auth import token_from_proxy_authorization
from aibridgeproxyd.usage import (
    ApiKind,
    Usage,
    usage_from_json,
    usage_from_websocket_message,
    usage_tap_for,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Header values as mitmproxy hands them over: bytes decoded as UTF-8 with surrogate escapes.
header_bytes = st.binary(max_size=200)
header_values = header_bytes.map(lambda b: b.decode("utf-8", "surrogateescape"))
any_text = st.text(max_size=200)


# --- proxy credentials --------------------------------------------------------------------------


@FUZZ
@given(st.one_of(header_values, any_text))
@example("Basic " + b"\xe9\xe9\xe9".decode("utf-8", "surrogateescape"))  # issue 8's example
@example("Basic \xe9\xe9\xe9")
@example("Basic " + "A" * 10_000)
def test_proxy_authorization_never_raises(value: str) -> None:
    token = token_from_proxy_authorization(value)
    assert token is None or (isinstance(token, str) and token)


@FUZZ
@given(st.text(max_size=80), st.text(min_size=1, max_size=80), st.sampled_from(["Basic", "bAsIc"]))
def test_well_formed_basic_credentials_always_yield_their_password(
    user: str, password: str, scheme: str
) -> None:
    if ":" in user:
        user = user.replace(":", "")
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert token_from_proxy_authorization(f"{scheme} {encoded}") == password


# --- CONNECT targets and literal IPs --------------------------------------------------------------


connect_targets = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda host, port: host + b":" + port,
        st.one_of(
            st.binary(max_size=40),
            st.ip_addresses().map(lambda ip: str(ip).encode()),
            st.ip_addresses(v=6).map(lambda ip: b"[" + str(ip).encode() + b"]"),
            st.ip_addresses(v=6).map(lambda ip: b"[" + str(ip).encode() + b"%1]"),
        ),
        st.one_of(st.integers(-5, 70000).map(lambda p: str(p).encode()), st.binary(max_size=6)),
    ),
)


@FUZZ
@given(connect_targets)
@example(b"[::%1]:443")
@example(b"[::%251]:443")
def test_connect_target_parsing_and_destination_checks_never_raise(target: bytes) -> None:
    """mitmproxy parses the request line (ValueError is its defined refusal: 400); whatever it
    accepts, our destination checks must handle."""
    head = [b"CONNECT " + target + b" HTTP/1.1", b"Host: x"]
    try:
        request = read_request_head(head)
    except ValueError:
        return
    host = request.host
    ip = literal_ip(host)
    if ip is not None:
        DestinationPolicy(()).is_blocked(ip)
        normalize_address(ip)


@FUZZ
@given(st.one_of(st.text(max_size=60), st.ip_addresses().map(str)))
@example("[::%1]")
@example("::%0")
@example("fe80::1%eth0")
def test_literal_ip_never_raises(host: str) -> None:
    ip = literal_ip(host)
    if ip is not None:
        assert isinstance(DestinationPolicy(()).is_blocked(ip), bool)


@FUZZ
@given(st.ip_addresses())
def test_every_address_gets_a_verdict(address: Any) -> None:
    assert isinstance(DestinationPolicy(()).is_blocked(address), bool)
    assert isinstance(DestinationPolicy(()).is_blocked(str(address)), bool)


# --- header values ---------------------------------------------------------------------------------


credential_headers = st.lists(
    st.tuples(
        st.sampled_from(["authorization", "x-api-key", "x-goog-api-key", "api-key", "other"]),
        header_bytes,
    ),
    max_size=6,
)


def make_headers(pairs: list[tuple[str, bytes]]) -> http.Headers:
    return http.Headers([(name.encode(), value) for name, value in pairs])


@FUZZ
@given(credential_headers, st.one_of(st.none(), any_text), any_text)
def test_credential_header_parsing_never_raises(
    pairs: list[tuple[str, bytes]], proxy_token: str | None, placeholder: str
) -> None:
    headers = make_headers(pairs)
    list(credential_values(headers))
    credential_mode(headers, proxy_token, placeholder or "aibridgeproxyd")
    remove_proxy_credentials(headers, proxy_token, placeholder or "aibridgeproxyd")
    if proxy_token:
        assert all(value != proxy_token for _, value in credential_values(headers))
    remove_all_credentials(headers)
    assert not list(credential_values(headers))


@FUZZ
@given(st.dictionaries(st.sampled_from(["user-agent", "x-title", "originator", "x"]), any_text))
def test_client_classification_never_raises(headers: dict[str, str]) -> None:
    assert isinstance(classify_client(headers), str)


@FUZZ
@given(st.one_of(st.none(), any_text, st.integers(0, 10**30).map(str)))
@example("²")  # a Unicode digit: str.isdigit() says yes, float() says no
@example("Fri, 31 Dec 9999 23:59:59 GMT")
@example("Mon, 01 Jan 0001 00:00:00 GMT")
def test_retry_after_never_raises(value: str | None) -> None:
    seconds = parse_retry_after(value)
    assert seconds is None or seconds >= 0


@FUZZ
@given(st.dictionaries(st.sampled_from(["content-type", "content-length", "x"]), any_text))
@example({"content-length": "²"})
def test_stream_decision_never_raises(headers: dict[str, str]) -> None:
    assert isinstance(should_stream(http.Headers(**headers)), bool)


@FUZZ
@given(st.binary(max_size=300))
@example(b'{"model": "\xe9"}')
def test_scanned_body_model_never_raises(body: bytes) -> None:
    model = scanned_body_model(body)
    assert model is None or isinstance(model, str)


@FUZZ
@given(
    st.sampled_from(["gzip", "x-gzip", "deflate", "br", "zstd", "identity", "gzip, br", "?"]),
    st.binary(max_size=300),
    st.booleans(),
    st.integers(0, 400),
)
def test_bounded_decoding_of_client_bodies_rejects_only_with_undecodable_body(
    coding: str, body: bytes, compress: bool, limit: int
) -> None:
    if compress and coding in ("gzip", "deflate", "br", "zstd"):
        body = mitmproxy_encoding.encode(body, coding)
    try:
        decoded = decode_bounded(body, coding, limit)
    except UndecodableBody:
        return
    assert len(decoded.data) <= limit


@FEW
@given(
    st.sampled_from(sorted(ADAPTERS)),
    credential_headers,
    st.text(max_size=40).map(lambda q: "/v1beta/models/x:generateContent?" + q),
)
def test_adapter_credential_normalisation_never_raises(
    adapter_type: str, pairs: list[tuple[str, bytes]], path: str
) -> None:
    flow = tflow.tflow()
    flow.request.path = path
    flow.request.headers = make_headers(pairs)
    adapter = ADAPTERS[adapter_type]
    adapter.normalize_credentials(flow.request)
    adapter.error_format(flow.request)


# --- configuration values and durations -------------------------------------------------------------

config_keys = st.sampled_from(sorted(k for k in _PARSERS if k != "providers"))


@FUZZ
@given(st.dictionaries(config_keys, st.text(max_size=40), max_size=4))
@example({"retention": "1e400d"})
@example({"reload_interval": "99999999999999999999999999d"})
@example({"listen": "[::1]:99999"})
@example({"max_request_body": "99999999999999999999g"})
def test_config_from_the_environment_raises_only_config_error(values: dict[str, str]) -> None:
    environ = {f"AIBRIDGEPROXYD_{key.upper()}": value for key, value in values.items()}
    with contextlib.suppress(ConfigError):
        load_config(environ=environ)


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@FEW
@given(st.dictionaries(st.one_of(config_keys, st.just("providers")), yaml_values, max_size=4))
def test_config_from_yaml_raises_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, values: dict[str, Any]
) -> None:
    import yaml

    path: Path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    with contextlib.suppress(ConfigError):
        load_config(path, environ={})


@FEW
@given(st.binary(max_size=200))
@example(b"\xff\xfe not utf-8")
@example(b"key: [unclosed")
def test_config_file_bytes_raise_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, content: bytes
) -> None:
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_bytes(content)
    with contextlib.suppress(ConfigError):
        load_config(path, environ={})


@FUZZ
@given(st.one_of(any_text, st.integers(), st.floats(), st.booleans(), st.none()))
@example("1e400s")
@example("nan")
def test_durations_are_positive_finite_seconds_or_value_error(value: Any) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    assert 0 < seconds < float("inf")


# --- upstream bytes: usage taps, SSE, Gemini arrays, AWS event streams ----------------------------


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


usage_objects = st.dictionaries(
    st.sampled_from(
        [
            "prompt_tokens",
            "completion_tokens",
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "promptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
            "cachedContentTokenCount",
            "prompt_tokens_details",
        ]
    ),
    st.one_of(
        st.integers(-(2**70), 2**70),
        st.text(max_size=5),
        st.none(),
        st.floats(),
        st.booleans(),
        st.dictionaries(st.just("cached_tokens"), st.integers()),
    ),
)

sse_streams = st.lists(
    st.one_of(
        st.builds(lambda u: {"usage": u, "model": "m"}, usage_objects),
        st.builds(lambda u: {"usageMetadata": u, "modelVersion": "g"}, usage_objects),
        st.builds(lambda u: {"type": "message_delta", "usage": u}, usage_objects),
        st.builds(lambda t: {"choices": [{"delta": {"content": t}}]}, any_text),
    ),
    max_size=6,
).map(lambda events: b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events))

gemini_arrays = st.lists(
    st.builds(lambda u: {"usageMetadata": u, "modelVersion": "g"}, usage_objects), max_size=4
).map(lambda items: json.dumps(items, indent=1).encode())


def assert_sane(usage: Usage) -> None:
    for count in (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
        usage.reasoning_output_tokens,
    ):
        assert count is None or (isinstance(count, int) and count >= 0)


@FUZZ
@given(
    st.sampled_from(list(ApiKind)),
    st.one_of(sse_streams, gemini_arrays, st.binary(max_size=400)),
    st.lists(st.integers(0, 10_000), max_size=8),
)
@example(ApiKind.OPENAI_CHAT_COMPLETIONS, b'data: {"usage": ' + b"[" * 50_000 + b"\n\n", [])
@example(ApiKind.GEMINI_GENERATE_CONTENT, b'[{"usageMetadata": {"promptTokenCount": 1e999}}]', [7])
@example(ApiKind.ANTHROPIC_MESSAGES, b'{"model": "\xff\xfe", "usage": {"input_tokens": 3}}', [11])
def test_usage_tap_reads_any_stream_without_a_problem(
    api_kind: ApiKind, body: bytes, cuts: list[int]
) -> None:
    if api_kind not in _TAPPED:
        return
    tap = usage_tap_for(api_kind)
    for piece in chunked(body, cuts):
        tap.feed(piece)
    tap.finish()
    # The tap swallows exceptions (it must never break a stream); a plain body must not need it.
    assert tap.problem is None, tap.problem
    assert_sane(tap.usage)
    assert tap.buffered_bytes == 0
    whole = usage_from_json(api_kind, body)
    assert_sane(whole)


def _tapped_kinds() -> set[ApiKind]:
    tapped = set()
    for kind in ApiKind:
        try:
            usage_tap_for(kind)
        except KeyError:
            continue
        tapped.add(kind)
    return tapped


_TAPPED = _tapped_kinds()


@FUZZ
@given(
    st.sampled_from(list(ApiKind)),
    st.one_of(sse_streams, gemini_arrays, st.binary(max_size=400)),
    st.booleans(),
)
def test_any_websocket_message_is_read_without_raising(
    api_kind: ApiKind, message: bytes, from_client: bool
) -> None:
    """Realtime, Responses over WebSocket and Gemini Live messages come from the network: any
    bytes give sane counts (or none), never an exception in the recording hook."""
    if api_kind not in _TAPPED:
        return
    assert_sane(usage_from_websocket_message(api_kind, message, from_client))


@FEW
@given(
    st.sampled_from(["gzip", "deflate", "br", "zstd", "x-unknown", ""]),
    st.one_of(sse_streams, st.binary(max_size=300)),
    st.booleans(),
    st.lists(st.integers(0, 5_000), max_size=5),
)
def test_usage_tap_on_compressed_or_corrupt_streams_never_raises(
    encoding: str, body: bytes, compress: bool, cuts: list[int]
) -> None:
    if compress and encoding in ("gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
        compressor = zlib.compressobj(wbits=wbits)
        body = compressor.compress(body) + compressor.flush()
    tap = usage_tap_for(ApiKind.OPENAI_CHAT_COMPLETIONS, encoding)
    for piece in chunked(body, cuts):
        tap.feed(piece)  # must not raise; corrupt input only sets tap.problem
    tap.finish()
    assert_sane(tap.usage)


# AWS event-stream frames (https://docs.aws.amazon.com/AmazonS3/latest/API/RESTSelectObjectAppendix.html):
# total length, headers length, prelude CRC, headers, payload, message CRC.


def _header(name: str, value: str) -> bytes:
    encoded_name, encoded_value = name.encode(), value.encode()
    return (
        bytes([len(encoded_name)])
        + encoded_name
        + b"\x07"
        + struct.pack(">H", len(encoded_value))
        + encoded_value
    )


def event_frame(headers: dict[str, str], payload: bytes) -> bytes:
    header_bytes_ = b"".join(_header(k, v) for k, v in headers.items())
    total = 12 + len(header_bytes_) + len(payload) + 4
    prelude = struct.pack(">II", total, len(header_bytes_))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + header_bytes_ + payload
    return message + struct.pack(">I", zlib.crc32(message))


chunk_payloads = st.one_of(
    st.builds(
        lambda event: json.dumps(
            {"bytes": base64.b64encode(json.dumps(event).encode()).decode()}
        ).encode(),
        st.one_of(
            st.dictionaries(st.sampled_from(["type", "usage", "delta"]), yaml_values, max_size=3),
            yaml_values,
        ),
    ),
    st.builds(
        lambda raw: json.dumps({"bytes": base64.b64encode(raw).decode()}).encode(),
        st.binary(max_size=60),
    ),
    st.binary(max_size=60),
    st.just(json.dumps({"bytes": base64.b64encode(b"[" * 100_000).decode()}).encode()),
)
event_frames = st.lists(
    st.one_of(
        st.builds(
            event_frame,
            st.fixed_dictionaries(
                {":message-type": st.sampled_from(["event", "exception", "error", "x"])},
                optional={
                    ":event-type": st.sampled_from(["chunk", "initial-response", "x"]),
                    ":exception-type": st.text(max_size=10),
                    ":error-code": st.text(max_size=10),
                },
            ),
            chunk_payloads,
        ),
        st.binary(max_size=40),  # garbage between frames
    ),
    max_size=5,
).map(b"".join)


@FUZZ
@given(event_frames, st.lists(st.integers(0, 2_000), max_size=6))
def test_bedrock_event_stream_conversion_never_raises(stream: bytes, cuts: list[int]) -> None:
    converter = EventStreamToSse()
    out = b""
    for piece in chunked(stream, cuts):
        out += converter.feed(piece)
    out += converter.feed(b"")  # end of stream
    # Everything that leaves is SSE: events separated by blank lines.
    assert out == b"" or out.endswith(b"\n\n")


@FEW
@given(event_frames)
def test_event_stream_frames_parse_or_raise_a_parser_error(stream: bytes) -> None:
    # botocore's buffer is what EventStreamToSse relies on to say "malformed" (ParserError).
    from botocore.eventstream import ParserError

    buffer = EventStreamBuffer()
    buffer.add_data(stream)
    try:
        for _ in buffer:
            pass
    except ParserError:
        pass


@FUZZ
@given(st.one_of(any_text, header_values))
@example("²")
@example("9" * 400)
def test_reading_any_declared_length_never_raises(length: str) -> None:
    from aibridgeproxyd.mitm.client_bounds import _declared_length

    flow = tflow.tflow()
    flow.request.headers["content-length"] = length
    declared = _declared_length(flow.request)
    assert declared is None or declared == int(length.strip())


# --- request bodies and paths through every adapter's rewrite ---------------------------------------

_ADAPTER_FIELDS: dict[str, dict[str, Any]] = {
    "azure": {
        "base_url": "https://example.openai.azure.com",
        "settings": {"deployments": {"gpt-4o": "prod"}},
    },
    "bedrock": {
        "settings": {
            "region": "us-east-1",
            "model": "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "access_key_id": "AKIDEXAMPLE",
            "secret_access_key": "secret",
        }
    },
    "openai-compat": {"base_url": "https://llm.example/v1"},
}

_DEEP_JSON = b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
json_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda obj: json.dumps(obj).encode(),
        st.dictionaries(
            st.sampled_from(["model", "messages", "stream", "max_tokens", "anthropic_beta", "x"]),
            yaml_values,
            max_size=4,
        ),
    ),
    st.just(_DEEP_JSON),
)


@FUZZ
@given(
    st.sampled_from(sorted(ADAPTERS)),
    st.sampled_from(
        [
            "/v1/chat/completions",
            "/v1/messages",
            "/v1/responses",
            "/v1beta/models/x:generateContent",
            "/",
        ]
    ),
    st.text(max_size=30),
    json_bodies,
    st.sampled_from(["application/json", "text/plain", ""]),
    st.one_of(st.none(), st.just("sk-central")),
)
@example("azure", "/v1/chat/completions", "", _DEEP_JSON, "application/json", "sk-central")
@example("bedrock", "/v1/messages", "", _DEEP_JSON, "application/json", None)
@example("anthropic", "/v1/messages", "", _DEEP_JSON, "application/json", "sk-central")
def test_every_adapter_rewrites_any_request_or_refuses_it(
    adapter_type: str, path: str, suffix: str, body: bytes, content_type: str, key: str | None
) -> None:
    from aibridgeproxyd.adapters.base import RouteRefusal
    from aibridgeproxyd.model import ProviderRecord, Status
    from aibridgeproxyd.providers import evaluate_providers

    (provider,) = evaluate_providers(
        [ProviderRecord(name="p", type=adapter_type, **_ADAPTER_FIELDS.get(adapter_type, {}))]
    )
    assume(provider.status is Status.ENABLED)
    flow = tflow.tflow()
    flow.request.method = "POST"
    flow.request.path = path + suffix
    flow.request.headers["content-type"] = content_type
    flow.request.content = body
    adapter = ADAPTERS[adapter_type]
    adapter.normalize_credentials(flow.request)
    try:
        transform = adapter.rewrite(flow.request, provider, key)
    except RouteRefusal:
        return
    if transform is not None:
        transform.start(tflow.tresp())
        transform.feed(b"garbage \x00\xff")
        transform.feed(b"")


# --- upstream proxy settings -------------------------------------------------------------------------


@FUZZ
@given(
    st.one_of(
        any_text,
        st.builds(
            lambda scheme, rest: scheme + "://" + rest,
            st.sampled_from(["http", "https", "socks5", ""]),
            st.text(max_size=60),
        ),
    )
)
@example("http://user:%ff%fe@proxy:8080")
@example("http://[::1%25eth0]:3128")
@example("http://proxy:99999")
def test_upstream_proxy_urls_parse_or_raise_value_error(text: str) -> None:
    from aibridgeproxyd.upstream_proxy import parse_upstream_proxy

    try:
        proxy = parse_upstream_proxy(text)
    except ValueError:
        return
    assert 0 < proxy.address[1] < 65536
    assert "://" in str(proxy)


@FUZZ
@given(st.lists(st.one_of(any_text, st.ip_addresses().map(str)), max_size=4), any_text)
@example(["10.0.0.0/8", "*.internal", ".corp"], "[::1%1]")
def test_no_proxy_entries_parse_or_raise_value_error(entries: list[str], host: str) -> None:
    from aibridgeproxyd.upstream_proxy import NoProxy

    try:
        no_proxy = NoProxy(entries)
    except ValueError:
        return
    assert isinstance(no_proxy.matches(host), bool)


# --- the admin listener's request heads ---------------------------------------------------------


@pytest.fixture(scope="module")
def admin_listener() -> Any:
    """A real AdminServer (uvicorn on its own loop in a thread) serving two operational routes."""
    import asyncio
    import threading

    from aibridgeproxyd.web.app import Reply, build_app
    from aibridgeproxyd.web.server import AdminServer

    loop = asyncio.new_event_loop()
    app = build_app(
        {"/metrics": lambda: Reply(200, b"ok"), "/healthz": lambda: Reply(200, b"")},
        None,  # type: ignore[arg-type]  # no API route reaches the context
    )
    server = AdminServer(app)
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0), loop).result(10)
    yield server.port
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda method, target, tail: method + b" " + target + b" HTTP/1.1" + tail,
            st.sampled_from([b"GET", b"HEAD", b"POST", b"get", b""]),
            st.sampled_from([b"/metrics", b"/healthz?x", b"/nope", b"", b"/ca-cert.pem"]),
            st.binary(max_size=50),
        ),
    )
)
def test_admin_request_heads_always_get_an_answer(admin_listener: int, head: bytes) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", admin_listener), timeout=5) as sock:
        sock.sendall(head + b"\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    # An answer with a status line, or a closed connection for bytes that are not HTTP at all.
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert answer.startswith(b"HTTP/1.1 ") and 200 <= status < 600 and status != 500
