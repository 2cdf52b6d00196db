"""End to end, the token-accounting rule (CONTRACT 10.1) on the real responses of issue 10
section 1: ``input_tokens`` is fresh input only, so that input + cache_read + cache_creation is
the whole prompt the provider billed, and a count the provider did not report is null. Each
test sends one example's exact usage through the real daemon with the client a user would run
(the official openai SDK; httpx where the SDK cannot compress a body) and checks the
interception record (``interceptions list``) and ``coder_aibridgeproxyd_tokens_total``.

The upstreams are ``FakeUpstream``: OpenAI (chat, Responses, ``/responses/compact``, Realtime
over WebSocket), and a second one standing for a LiteLLM proxy behind an ``openai-compat``
provider. ``x-fake-usage`` makes a fake report an example's usage object verbatim.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import Any, cast

import brotli
import pytest

from tests.fakes.upstream import HEADER_STATUS, HEADER_USAGE, FakeUpstream
from tests.harness import DaemonProcess, ca_bundle, trust

try:  # Python 3.14+; before that the backport mitmproxy depends on
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef]

LITELLM_HOST = "litellm.internal.example"
REQUEST_ID_HEADER = "x-aibridge-request-id"
COUNT_FIELDS = (
    "input_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "output_tokens",
    "reasoning_output_tokens",
)
TOKEN_TYPES = ("input", "cache_read", "cache_creation", "output")
ABSENT = "<field absent>"

# --- the examples of issue 10 section 1, exactly as the providers reported them ----------------

# OpenAI Realtime `response.done`: cached tokens are a subset of input_tokens (Realtime API
# reference as generated into openai-python, types/realtime/realtime_response_usage*.py).
REALTIME_MODEL = "gpt-4o-realtime-preview"
REALTIME_USAGE = {
    "input_tokens": 132,
    "output_tokens": 121,
    "input_token_details": {"cached_tokens": 64},
}
# A LiteLLM proxy's chat usage after an Anthropic cache write: the write is inside
# prompt_tokens, reported in prompt_tokens_details.cache_creation_tokens and again top-level as
# cache_creation_input_tokens (LiteLLM docs, "Prompt Caching"). total_tokens is required by the
# OpenAI chat usage schema and changes no count.
LITELLM_USAGE = {
    "prompt_tokens": 10032,
    "completion_tokens": 12,
    "total_tokens": 10044,
    "prompt_tokens_details": {"cache_creation_tokens": 10017},
    "cache_creation_input_tokens": 10017,
}
# POST /v1/responses/compact answering 200 JSON (OpenAI API reference, "Compact a response";
# openai-python types/responses/compacted_response.py: a Responses usage object, no model).
COMPACT_USAGE = {
    "input_tokens": 192000,
    "input_tokens_details": {"cached_tokens": 150000},
    "output_tokens": 2100,
}
# A Responses answer of a reasoning model, in the current ResponseUsage shape (openai-python
# types/responses/response_usage.py: every detail field present, so cached_tokens and
# cache_write_tokens are reported as 0). output_tokens includes the reasoning tokens, which are
# billed as output.
REASONING_USAGE = {
    "input_tokens": 36,
    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    "output_tokens": 87,
    "output_tokens_details": {"reasoning_tokens": 40},
    "total_tokens": 123,
}


@pytest.fixture(scope="module")
def litellm() -> Iterator[FakeUpstream]:
    """A LiteLLM-style proxy: OpenAI chat format under /v1, its own TLS identity."""
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def daemon(
    upstream: FakeUpstream, litellm: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonProcess]:
    bundle = ca_bundle(
        tmp_path_factory.mktemp("upstream-ca") / "bundle.pem",
        upstream.ca_pem_path,
        litellm.ca_pem_path,
    )
    with DaemonProcess({"upstream_ca_file": bundle}) as d:
        d.edit_provider("openai", upstream.base_url, "sk-openai-central")
        d.cli(
            "providers", "add", "litellm", "--type", "openai-compat", "--base-url",
            litellm.base_url, "--host", LITELLM_HOST, "--key", "sk-litellm-central", check=True,
        )  # fmt: skip
        d.reload_and_wait()
        yield d


@pytest.fixture(autouse=True)
def clean_fakes(upstream: FakeUpstream, litellm: FakeUpstream) -> None:
    upstream.reset()
    litellm.reset()


# --- helpers -----------------------------------------------------------------------------------


def records(daemon: DaemonProcess, *args: str) -> list[dict[str, Any]]:
    return cast(
        list[dict[str, Any]],
        json.loads(daemon.cli("interceptions", "list", *args, check=True).stdout),
    )


def record_with_id(daemon: DaemonProcess, request_id: str) -> dict[str, Any]:
    """The interception record of the request the client saw as ``request_id``."""
    return daemon.wait_for(
        lambda: next((r for r in records(daemon) if r["id"] == request_id), None),
        message=f"record {request_id}",
    )


def summary(record: dict[str, Any], *fields: str) -> dict[str, Any]:
    """``fields`` and the token counts of ``record``, ``ABSENT`` for a field it does not have:
    compared as one dict, so that a failure shows every value at once."""
    return {name: record.get(name, ABSENT) for name in (*fields, *COUNT_FIELDS)}


def tokens_total(daemon: DaemonProcess, provider: str) -> dict[str, float]:
    """``tokens_total`` of ``provider`` by type; a series not yet created counts 0."""
    return {t: daemon.metric("tokens_total", provider=provider, type=t) or 0.0 for t in TOKEN_TYPES}


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {t: after[t] - before[t] for t in TOKEN_TYPES}


def usage_header(usage: dict[str, Any]) -> dict[str, str]:
    return {HEADER_USAGE: json.dumps(usage)}


# --- OpenAI Realtime over WebSocket --------------------------------------------------------------


def test_realtime_session_records_fresh_input_cached_reads_and_the_model(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    token = daemon.create_token("realtime-user")
    before = tokens_total(daemon, "openai")
    client = daemon.openai_client(token)
    # The SDK opens wss://api.openai.com/v1/realtime?model=...; websockets takes the proxy
    # (with the token) and the CA the SDK does not know how to pass on its own.
    connection_options = cast(
        Any, {"proxy": daemon.proxy_url_for(token), "ssl": trust(daemon.ca_cert_path)}
    )
    with client.realtime.connect(
        model=REALTIME_MODEL,
        extra_headers=usage_header(REALTIME_USAGE),
        websocket_connection_options=connection_options,
    ) as connection:
        created = connection.recv()
        assert created.type == "session.created"
        connection.response.create()
        for event in connection:
            if event.type == "response.done":
                break
        assert event.response.usage is not None
        assert event.response.usage.input_tokens == 132  # the client got the usage untouched

    (upgrade,) = upstream.requests
    assert upgrade.path == f"/v1/realtime?model={REALTIME_MODEL}"
    assert upgrade.headers["authorization"] == "Bearer sk-openai-central"
    (record,) = daemon.wait_for(
        lambda: records(daemon, "--initiator", "realtime-user"), message="the session's record"
    )
    assert summary(record, "path", "status", "model") == {
        "path": "/v1/realtime",
        "status": 101,
        "model": REALTIME_MODEL,  # the ?model= of the upgrade, and session.created's
        "input_tokens": 68,
        "cache_read_input_tokens": 64,
        "cache_creation_input_tokens": None,
        "output_tokens": 121,
        "reasoning_output_tokens": None,
    }
    assert moved(before, tokens_total(daemon, "openai")) == {
        "input": 68,
        "cache_read": 64,
        "cache_creation": 0,
        "output": 121,
    }


# --- an OpenAI-compatible gateway reporting cache writes ----------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "sse"])
def test_openai_compat_gateway_cache_writes_are_not_counted_as_fresh_input(
    daemon: DaemonProcess, token: str, litellm: FakeUpstream, streamed: bool
) -> None:
    before = tokens_total(daemon, "litellm")
    client = daemon.openai_client(token, base_url=f"https://{LITELLM_HOST}/v1")
    arguments: dict[str, Any] = {
        "model": "claude-sonnet-4-5",  # a LiteLLM model alias
        "messages": [{"role": "user", "content": "summarise the attached contract"}],
        "extra_headers": usage_header(LITELLM_USAGE),
    }
    if streamed:
        raw = client.chat.completions.with_raw_response.create(
            **arguments, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(raw.parse())
        assert chunks[-1].choices == [] and chunks[-1].usage is not None  # usage comes last
        assert chunks[-1].usage.prompt_tokens == 10032
    else:
        raw = client.chat.completions.with_raw_response.create(**arguments)
        assert raw.parse().usage is not None

    (request,) = litellm.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-litellm-central"
    record = record_with_id(daemon, raw.headers[REQUEST_ID_HEADER])
    assert summary(record, "path", "streamed", "model") == {
        "path": "/v1/chat/completions",
        "streamed": streamed,
        "model": "claude-sonnet-4-5",
        "input_tokens": 15,
        "cache_read_input_tokens": None,
        "cache_creation_input_tokens": 10017,
        "output_tokens": 12,
        "reasoning_output_tokens": None,
    }
    assert moved(before, tokens_total(daemon, "litellm")) == {
        "input": 15,
        "cache_read": 0,
        "cache_creation": 10017,
        "output": 12,
    }


# --- POST /v1/responses/compact ------------------------------------------------------------------


def test_responses_compact_usage_is_recorded_and_counted(daemon: DaemonProcess, token: str) -> None:
    before = tokens_total(daemon, "openai")
    client = daemon.openai_client(token)
    raw = client.responses.with_raw_response.compact(
        model="gpt-5.1-codex-max",
        input=[{"role": "user", "content": "refactor the parser"}],
        extra_headers=usage_header(COMPACT_USAGE),
    )
    compacted = raw.parse()
    assert compacted.object == "response.compaction"
    assert compacted.output[-1].type == "compaction"

    record = record_with_id(daemon, raw.headers[REQUEST_ID_HEADER])
    assert summary(record, "path", "status", "streamed", "model") == {
        "path": "/v1/responses/compact",
        "status": 200,
        "streamed": False,
        "model": "gpt-5.1-codex-max",  # from the request: the answer names none
        "input_tokens": 42000,
        "cache_read_input_tokens": 150000,
        "cache_creation_input_tokens": None,
        "output_tokens": 2100,
        "reasoning_output_tokens": None,
    }
    assert moved(before, tokens_total(daemon, "openai")) == {
        "input": 42000,
        "cache_read": 150000,
        "cache_creation": 0,
        "output": 2100,
    }


# --- reasoning tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "sse"])
def test_reasoning_tokens_of_a_responses_answer_are_recorded(
    daemon: DaemonProcess, token: str, streamed: bool
) -> None:
    before = tokens_total(daemon, "openai")
    client = daemon.openai_client(token)
    raw = client.responses.with_raw_response.create(
        model="o4-mini",
        input="how many primes are below 100?",
        stream=streamed,
        extra_headers=usage_header(REASONING_USAGE),
    )
    if streamed:
        events = list(cast(Any, raw.parse()))
        assert events[-1].type == "response.completed"
    else:
        assert raw.parse().usage is not None

    record = record_with_id(daemon, raw.headers[REQUEST_ID_HEADER])
    assert summary(record, "path", "streamed", "model") == {
        "path": "/v1/responses",
        "streamed": streamed,
        "model": "o4-mini",
        "input_tokens": 36,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
        "output_tokens": 87,  # reasoning included, as OpenAI bills it
        "reasoning_output_tokens": 40,
    }
    assert moved(before, tokens_total(daemon, "openai")) == {
        "input": 36,
        "cache_read": 0,
        "cache_creation": 0,
        "output": 87,
    }


# --- compressed request bodies -------------------------------------------------------------------

# A coding agent's request: long, repetitive (tool output), what clients bother to compress.
CONVERSATION = [
    {"role": "system", "content": "You are a coding agent. Use the tools to edit files."},
    *(
        {"role": "user", "content": f"tool output {turn}: " + "src/parser.py: ok\n" * 40}
        for turn in range(20)
    ),
    {"role": "user", "content": "now fix the failing test"},
]
# Each coding with a model its test alone asks for (Codex compresses with zstd).
COMPRESS = {
    "gzip": (gzip.compress, "gpt-4.1"),
    "zstd": (zstd.compress, "gpt-5-codex"),
    "br": (brotli.compress, "gpt-4.1-mini"),
}


@pytest.mark.parametrize("encoding", list(COMPRESS))
def test_model_is_read_from_a_compressed_request_body(
    daemon: DaemonProcess, token: str, upstream: FakeUpstream, encoding: str
) -> None:
    compress, model = COMPRESS[encoding]
    body = json.dumps({"model": model, "messages": CONVERSATION}).encode()
    compressed = compress(body)
    # Small bodies may keep their text as literal bytes (zstd does): then a reader that never
    # decodes would still find the model, and the test would prove nothing.
    assert b'"model"' not in compressed and model.encode() not in compressed
    with daemon.httpx_client(token) as client:
        response = client.post(
            "https://api.openai.com/v1/chat/completions",
            content=compressed,
            headers={
                "content-type": "application/json",
                "content-encoding": encoding,
                "authorization": "Bearer aibridgeproxyd",
                # An answer that names no model: the record's model can only come from the
                # request body.
                HEADER_STATUS: "400",
            },
        )
    assert response.status_code == 400
    (request,) = upstream.requests
    assert request.headers["content-encoding"] == encoding
    assert request.body == compressed  # passed on as sent
    assert request.json()["model"] == model

    record = record_with_id(daemon, response.headers[REQUEST_ID_HEADER])
    assert (record["status"], record["model"]) == (400, model)
