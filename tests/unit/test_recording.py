"""Record assembly, without a proxy: usage sums, the usage of a finished exchange (streamed,
buffered, WebSocket), the upstream error body as it is logged, and the record itself."""

from __future__ import annotations

import json
import tracemalloc

from mitmproxy import http
from mitmproxy.test import tflow

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.credentials import CredentialMode
from aibridgeproxyd.errors import SecretRedactor
from aibridgeproxyd.interception.recording import (
    ERROR_BODY_LOG_LIMIT,
    TAP_BATCH_BYTES,
    USER_AGENT_LIMIT,
    TapBatch,
    build_record,
    error_body_for_log,
    finished_usage,
    read_request_model,
    read_user_agent,
    redact_recorded_text,
    sum_usage,
    tap_usage,
    upstream_ttfb,
    websocket_usage,
)
from aibridgeproxyd.interception.state import (
    METADATA_KEY,
    ConnectInfo,
    RecordingState,
    RequestContext,
)
from aibridgeproxyd.usage import ApiKind, Usage
from tests.unit.stream_layer import deliver

try:
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # Python before 3.14
    from backports import zstd  # type: ignore[no-redef,unused-ignore]
from tests.unit.test_adapters_common import routed

KEY = "sk-central-unit-0123456789abcdef"
CHAT_USAGE = b'{"model": "gpt-4o", "usage": {"prompt_tokens": 3, "completion_tokens": 5}}'
SSE_USAGE = (
    b'data: {"model": "gpt-4o", "choices": []}\n\n'
    b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}\n\n'
    b"data: [DONE]\n\n"
)


def make_ctx() -> RequestContext:
    connect = ConnectInfo("api.openai.com", 443, intercept=True, identity="alice")
    ctx = RequestContext("r-1", connect, routed("openai", keys=(KEY,)), ADAPTERS["openai"])
    ctx.started = 1_800_000_000.0
    recording = ctx.recording
    recording.client, recording.method, recording.path = "Codex", "POST", "/v1/chat/completions"
    recording.api_kind = ApiKind.OPENAI_CHAT_COMPLETIONS
    recording.request_model = "gpt-4o-requested"
    return ctx


def flow_with(status: int, body: bytes) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.response = http.Response.make(status, body, {"content-type": "application/json"})
    return flow


# --- usage -----------------------------------------------------------------------------------


def test_usage_sums_per_token_type_and_keeps_counts_reported_on_one_side() -> None:
    total = sum_usage(
        Usage(input_tokens=1, output_tokens=None, cache_read_input_tokens=4, model="a"),
        Usage(input_tokens=2, output_tokens=7, cache_read_input_tokens=None, model="b"),
    )
    assert total == Usage(
        input_tokens=3, output_tokens=7, cache_read_input_tokens=4, model="a"
    )  # a count reported by neither side stays unknown
    assert total.cache_creation_input_tokens is None
    assert sum_usage(None, Usage(output_tokens=1)) == Usage(output_tokens=1)


def test_reasoning_tokens_are_summed_like_the_other_counts_and_stay_unknown_if_never_reported() -> (
    None
):
    first = Usage(output_tokens=300, reasoning_output_tokens=256)
    second = Usage(output_tokens=40, reasoning_output_tokens=None)
    assert sum_usage(first, second).reasoning_output_tokens == 256
    assert sum_usage(sum_usage(first, second), first).reasoning_output_tokens == 512
    assert sum_usage(Usage(output_tokens=1), Usage(output_tokens=2)).reasoning_output_tokens is None


def test_a_websocket_session_sums_the_usage_of_each_response() -> None:
    done = {"type": "response.completed", "response": {"usage": {"input_tokens": 2, "output_tokens": 3}}}  # fmt: skip
    message = json.dumps(done).encode()
    total = websocket_usage(None, message, ApiKind.OPENAI_RESPONSES)
    delta = b'{"type": "response.output_text.delta", "delta": "hi"}'
    total = websocket_usage(total, delta, ApiKind.OPENAI_RESPONSES)
    total = websocket_usage(total, message, ApiKind.OPENAI_RESPONSES)
    assert total is not None and (total.input_tokens, total.output_tokens) == (4, 6)


def test_a_websocket_session_without_usage_records_no_tokens() -> None:
    flow = tflow.twebsocketflow()
    assert finished_usage(flow, RecordingState()) == Usage()


def test_a_buffered_answer_is_read_whole_for_usage() -> None:
    usage = finished_usage(flow_with(200, CHAT_USAGE), make_ctx().recording)
    assert (usage.input_tokens, usage.output_tokens, usage.model) == (3, 5, "gpt-4o")


def test_an_error_answer_or_an_unknown_api_reports_no_usage() -> None:
    assert finished_usage(flow_with(400, CHAT_USAGE), make_ctx().recording) == Usage()
    assert finished_usage(flow_with(200, CHAT_USAGE), RecordingState()) == Usage()


def test_a_streamed_answer_is_read_by_the_tap_as_its_chunks_pass() -> None:
    flow = flow_with(200, b"")
    assert flow.response is not None
    flow.response.stream = True
    flow.metadata[METADATA_KEY] = ctx = make_ctx()
    recording = ctx.recording
    tap_usage(flow.response, recording, transformed=False)
    assert flow.response.stream is True and recording.usage_tap is not None
    out = deliver(flow, [SSE_USAGE[i : i + 7] for i in range(0, len(SSE_USAGE), 7)])
    assert out == SSE_USAGE  # the client gets every byte unchanged
    usage = finished_usage(flow, recording)
    assert (usage.input_tokens, usage.output_tokens) == (3, 5)


def test_the_taps_read_sent_chunks_in_batches_and_everything_before_their_results() -> None:
    read: list[bytes] = []
    batch = TapBatch(read.append)
    small = b"data: {}\n\n"
    for _ in range(TAP_BATCH_BYTES // len(small)):
        batch.add(small)
    assert read == []  # held: under the batch size
    batch.add(small)
    assert read == [small * (TAP_BATCH_BYTES // len(small) + 1)]  # one piece, in order
    batch.add(b"tail")
    batch.flush()
    batch.flush()  # nothing held: nothing fed
    assert read[1:] == [b"tail"]
    # The recording reads the taps' results only after handing them what the batch held: a
    # stream shorter than one batch still has its usage.
    flow = flow_with(200, b"")
    assert flow.response is not None
    flow.response.stream = True
    flow.metadata[METADATA_KEY] = ctx = make_ctx()
    tap_usage(flow.response, ctx.recording, transformed=False)
    assert ctx.recording.chunk_tap is not None
    ctx.recording.chunk_tap(SSE_USAGE)
    usage = finished_usage(flow, ctx.recording)
    assert (usage.input_tokens, usage.output_tokens) == (3, 5)


def test_a_streamed_transform_feeds_the_tap_what_it_writes() -> None:
    flow = flow_with(200, b"")
    assert flow.response is not None
    flow.response.stream = lambda chunk: [chunk.upper(), b""]
    flow.metadata[METADATA_KEY] = ctx = make_ctx()
    tap_usage(flow.response, ctx.recording, transformed=True)
    assert deliver(flow, [SSE_USAGE]) == SSE_USAGE.upper()
    usage = finished_usage(flow, ctx.recording)  # the tap read the upper-cased bytes: no usage
    assert ctx.recording.usage_tap is not None and not usage.reported


def test_a_streamed_error_or_buffered_answer_gets_no_tap() -> None:
    recording = make_ctx().recording
    streamed_error = http.Response.make(429, b"")
    streamed_error.stream = True
    tap_usage(streamed_error, recording, transformed=False)
    buffered = http.Response.make(200, CHAT_USAGE)
    tap_usage(buffered, recording, transformed=False)
    assert recording.usage_tap is None and streamed_error.stream is True


# --- the error body as logged ----------------------------------------------------------------


def test_an_echoed_key_is_redacted_from_the_logged_error_body() -> None:
    body = f'{{"error": {{"message": "Incorrect API key provided: {KEY}"}}}}'.encode()
    text = error_body_for_log(body, SecretRedactor([KEY]))
    assert KEY not in text and KEY[:12] not in text
    assert text.startswith('{"error": {"message": "Incorrect API key provided: ')


def test_a_long_error_body_is_cut_after_redaction() -> None:
    # The key straddles the cut: redacted first, so no half of it is left at the cut.
    body = b"x" * (ERROR_BODY_LOG_LIMIT - 5) + KEY.encode() + b"y" * 100
    text = error_body_for_log(body, SecretRedactor([KEY]))
    assert text.endswith("...(truncated)") and KEY[:5] not in text
    assert len(text) == ERROR_BODY_LOG_LIMIT + len("...(truncated)")
    assert error_body_for_log(b"short", SecretRedactor([])) == "short"


# --- the record ------------------------------------------------------------------------------


def test_an_upstream_answer_is_recorded_with_its_timing_and_usage() -> None:
    ctx = make_ctx()
    ctx.recording.ttfb = 0.0123456
    flow = flow_with(200, CHAT_USAGE)
    usage = Usage(input_tokens=3, output_tokens=5, model="gpt-4o-2024")
    record = build_record(ctx, flow.response, usage, None, ctx.started + 1.5)
    assert (record.request_id, record.connect_id, record.initiator) == (
        "r-1",
        ctx.connect.connect_id,
        "alice",
    )
    assert (record.provider, record.provider_type, record.client) == ("openai", "openai", "Codex")
    assert (record.method, record.path, record.status, record.streamed) == (
        "POST",
        "/v1/chat/completions",
        200,
        False,
    )
    assert (record.model, record.input_tokens, record.output_tokens) == ("gpt-4o-2024", 3, 5)
    assert (record.ttfb_ms, record.duration_ms, record.error) == (12.346, 1500.0, None)
    assert record.started_at == "2027-01-15T08:00:00.000Z"
    assert record.ended_at == "2027-01-15T08:00:01.500Z"


def test_the_record_carries_reasoning_tokens_where_reported_and_null_where_not() -> None:
    ctx = make_ctx()
    response = flow_with(200, b"{}").response
    reasoned = Usage(input_tokens=3, output_tokens=300, reasoning_output_tokens=256)
    record = build_record(ctx, response, reasoned, None, ctx.started + 1)
    assert (record.output_tokens, record.reasoning_output_tokens) == (300, 256)
    unreported = build_record(ctx, response, Usage(output_tokens=5), None, ctx.started + 1)
    assert unreported.reasoning_output_tokens is None


def test_the_requested_model_is_recorded_when_the_answer_names_none() -> None:
    ctx = make_ctx()
    record = build_record(ctx, flow_with(200, b"{}").response, Usage(), None, ctx.started)
    assert record.model == "gpt-4o-requested"


def test_a_refusal_is_recorded_with_its_code_and_no_ttfb() -> None:
    ctx = make_ctx()
    ctx.recording.ttfb = 0.2  # taken before the proxy replaced the upstream's answer
    ctx.proxy_answer_code = "all_keys_rejected"
    record = build_record(ctx, flow_with(502, b"{}").response, Usage(), None, ctx.started + 1)
    assert (record.status, record.error, record.ttfb_ms) == (502, "all_keys_rejected", None)


def test_the_model_read_on_the_head_is_kept_and_a_body_is_read_only_while_none_is_known() -> None:
    ctx = make_ctx()  # "gpt-4o-requested", as if read on the head
    request = flow_with(200, b"{}").request
    request.content = b'{"model": "gpt-4o-mini"}'
    read_request_model(ctx, request)
    assert ctx.recording.request_model == "gpt-4o-requested"
    ctx.recording.request_model = None
    read_request_model(ctx, request)
    assert ctx.recording.request_model == "gpt-4o-mini"


def test_the_ttfb_is_the_upstream_answers_and_none_once_the_proxy_answered() -> None:
    ctx = make_ctx()
    assert upstream_ttfb(ctx) is None  # no response header arrived
    ctx.recording.ttfb = 0.2
    assert upstream_ttfb(ctx) == 0.2
    ctx.proxy_answer_code = "upstream_timeout"
    assert upstream_ttfb(ctx) is None


def test_a_failed_exchange_is_recorded_with_its_error_and_no_status() -> None:
    ctx = make_ctx()
    record = build_record(ctx, None, Usage(), "connection reset", ctx.started + 1)
    assert (record.status, record.streamed, record.error) == (None, False, "connection reset")


def test_the_record_names_the_provider_by_type_and_name_and_the_central_key_masked() -> None:
    ctx = make_ctx()
    ctx.routing.credential_mode = CredentialMode.CENTRAL
    ctx.routing.use_key(0)
    ctx.recording.user_agent = "codex_cli_rs/0.1"
    record = build_record(ctx, flow_with(200, b"{}").response, Usage(), None, ctx.started)
    assert (record.provider, record.provider_name, record.user_agent) == (
        "openai",
        "openai",
        "codex_cli_rs/0.1",
    )
    assert (record.credential_kind, record.credential_hint) == ("central", "sk-\u2026cdef")
    assert KEY[:5] not in repr(record) and KEY[-5:] not in repr(record)


def test_a_byok_record_carries_the_clients_key_masked_and_a_refusal_before_routing_none() -> None:
    ctx = make_ctx()
    ctx.routing.credential_mode = CredentialMode.BYOK
    ctx.routing.byok_hint = "sk-\u2026WXYZ"
    record = build_record(ctx, flow_with(200, b"{}").response, Usage(), None, ctx.started)
    assert (record.credential_kind, record.credential_hint) == ("byok", "sk-\u2026WXYZ")
    refused = build_record(make_ctx(), None, Usage(), None, ctx.started)
    assert (refused.credential_kind, refused.credential_hint, refused.user_agent) == (None,) * 3


def test_the_user_agent_is_read_from_the_head_and_cut_at_its_limit_after_redaction() -> None:
    # A key straddling the cut is redacted whole: the head is read past the limit, the record
    # cut after redaction, so no part of the key is left at the cut.
    ctx, flow = make_ctx(), tflow.tflow()
    flow.request.headers["user-agent"] = "x" * (USER_AGENT_LIMIT - 10) + KEY + "y" * 50
    read_user_agent(ctx, flow.request)
    record = build_record(ctx, None, Usage(), None, ctx.started + 1)
    record = redact_recorded_text(record, flow, ctx, 1000)
    assert (
        record.user_agent == ("x" * (USER_AGENT_LIMIT - 10) + "***" + "y" * 50)[:USER_AGENT_LIMIT]
    )
    flow.request.headers["user-agent"] = "x" * (USER_AGENT_LIMIT + 50)
    read_user_agent(ctx, flow.request)
    record = redact_recorded_text(
        build_record(ctx, None, Usage(), None, ctx.started + 1), flow, ctx, 1000
    )
    assert record.user_agent == "x" * USER_AGENT_LIMIT
    del flow.request.headers["user-agent"]
    read_user_agent(ctx, flow.request)
    assert ctx.recording.user_agent is None


def test_recorded_text_is_cut_even_when_the_request_knows_no_secret() -> None:
    # No provider key, no proxy token, no credential: nothing to redact, still cut (the readers
    # collect past the cut).
    connect = ConnectInfo("vllm.internal", 443, intercept=True)
    ctx = RequestContext("r-2", connect, routed("openai", keys=()), ADAPTERS["openai"])
    ctx.started = 1_800_000_000.0
    ctx.recording.prompt = "p" * 5000
    record = redact_recorded_text(
        build_record(ctx, None, Usage(), None, ctx.started + 1), tflow.tflow(), ctx, 100
    )
    assert record.prompt == "p" * 100


def test_a_buffered_compressed_answer_is_read_for_usage_piece_by_piece() -> None:
    gzipped = flow_with(200, b"")
    assert gzipped.response is not None
    gzipped.response.headers["content-encoding"] = "gzip"
    gzipped.response.content = CHAT_USAGE  # encoded by mitmproxy
    assert gzipped.response.raw_content != CHAT_USAGE
    usage = finished_usage(gzipped, make_ctx().recording)
    assert (usage.input_tokens, usage.output_tokens) == (3, 5)
    # A header that lies (says gzip, body plain): nothing can be read, nothing is guessed.
    lying = flow_with(200, CHAT_USAGE)
    assert lying.response is not None
    lying.response.headers["content-encoding"] = "gzip"
    assert finished_usage(lying, make_ctx().recording) == Usage()


def test_a_buffered_decompression_bomb_is_not_decoded_whole() -> None:
    """16 KiB of zstd that decode to 512 MiB: reading stops at the decoding ratio's bound."""
    compressor = zstd.ZstdCompressor()
    bomb = b"".join(compressor.compress(b"\0" * 2**20) for _ in range(512)) + compressor.flush()
    flow = flow_with(200, bomb)
    assert flow.response is not None
    flow.response.headers["content-encoding"] = "zstd"
    tracemalloc.start()
    try:
        assert finished_usage(flow, make_ctx().recording) == Usage()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20
