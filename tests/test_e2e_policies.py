"""End to end, policies (docs/policies.md, CONTRACT 15): the real daemon, policies set with the
real CLI, and the official openai and anthropic SDKs against the fake upstream.

Each test is its own user (a proxy token of its own), so the counters of one test never limit
another. Prices come from the config's ``prices:``: $0.001 per token for both fake models, so
one fake response (11 input tokens, 3 of them cached, 3 output tokens for OpenAI) costs about
$0.014.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any, cast

import anthropic
import httpx
import openai
import pytest

from tests.fakes.upstream import (
    DEFAULT_ANTHROPIC_MODEL,
    DEFAULT_OPENAI_MODEL,
    HEADER_EVENTS,
    HEADER_STREAM_ID,
    FakeUpstream,
)
from tests.harness import DaemonProcess, avoid_minute_boundary

pytestmark = pytest.mark.usefixtures("clean_upstream")

PRICE = {"input": 1000, "output": 1000}  # USD per million tokens: $0.001 a token


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    config = {
        "upstream_ca_file": upstream.ca_pem_path,
        "prices": {DEFAULT_OPENAI_MODEL: PRICE, DEFAULT_ANTHROPIC_MODEL: PRICE},
    }
    with DaemonProcess(config) as d:
        d.edit_provider("openai", upstream.base_url, "sk-openai-central")
        d.edit_provider("anthropic", upstream.origin, "sk-anthropic-central")
        d.reload_and_wait()
        yield d


def set_policy(daemon: DaemonProcess, *options: str) -> None:
    """``policies set`` with ``options``; it returns once the running daemon applied it."""
    result = daemon.cli("policies", "set", *options, check=True)
    assert "did not confirm" not in result.stderr, result.stderr


def chat(client: openai.OpenAI, model: str = DEFAULT_OPENAI_MODEL, **options: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], **options
    )


def message(client: anthropic.Anthropic) -> Any:
    return client.messages.create(
        model=DEFAULT_ANTHROPIC_MODEL,
        max_tokens=16,
        messages=[{"role": "user", "content": "hi"}],
    )


def refusals(daemon: DaemonProcess, reason: str) -> float:
    return daemon.metric("policy_refusals_total", reason=reason) or 0.0


def records_of(daemon: DaemonProcess, user: str) -> list[dict[str, Any]]:
    listed = daemon.cli("interceptions", "list", "--initiator", user, check=True).stdout
    return cast(list[dict[str, Any]], json.loads(listed))


def spend(daemon: DaemonProcess, user: str) -> dict[str, Any]:
    """The all-provider scope of ``policies show --user``: limits, spend, this minute."""
    report = json.loads(daemon.cli("policies", "show", "--user", user, check=True).stdout)
    return cast(dict[str, Any], report["scopes"][0])


# --- budgets ----------------------------------------------------------------------------------


def test_user_over_budget_gets_403_budget_exceeded_in_the_openai_shape(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    token = daemon.create_token("budget-openai")
    set_policy(daemon, "--user", "budget-openai", "--budget-usd", "0.01", "--period", "day")
    client = daemon.openai_client(token)
    before = refusals(daemon, "budget_exceeded")
    chat(client)  # under budget: admitted; costs about $0.014
    with pytest.raises(openai.PermissionDeniedError) as refused:
        chat(client)
    assert refused.value.status_code == 403
    assert refused.value.code == "budget_exceeded"
    assert "daily budget is used up" in str(refused.value)  # the SDK surfaces our message
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len(upstream.requests) == 1  # the refused request never left the proxy
    assert refusals(daemon, "budget_exceeded") == before + 1
    recorded = daemon.wait_for(
        lambda: [r for r in records_of(daemon, "budget-openai") if r["error"]],
        message="the refusal's interception record",
    )
    assert [(r["status"], r["error"]) for r in recorded] == [(403, "budget_exceeded")]
    daemon.wait_for(
        lambda: (daemon.metric("policy_budget_used_ratio", user="budget-openai") or 0) >= 1,
        message="policy_budget_used_ratio at 1 after the reconciliation",
    )


def test_user_over_budget_gets_403_in_the_anthropic_shape(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    token = daemon.create_token("budget-anthropic")
    set_policy(daemon, "--user", "budget-anthropic", "--max-tokens", "10", "--period", "month")
    client = daemon.anthropic_client(token)
    message(client)  # 0 tokens so far: admitted; reports more than 10
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        message(client)
    assert refused.value.status_code == 403
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "permission_error", "message": refused.value.body["error"]["message"]},
    }
    assert "monthly budget is used up" in refused.value.message
    assert len(upstream.requests) == 1


# --- model allow-lists --------------------------------------------------------------------------


def test_a_model_outside_the_allow_list_is_refused_and_one_inside_is_routed(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    token = daemon.create_token("models-user")
    set_policy(daemon, "--user", "models-user", "--models", "gpt-4o*,o3")
    client = daemon.openai_client(token)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        chat(client, model="gpt-3.5-turbo")
    assert refused.value.code == "model_not_allowed"
    assert "gpt-3.5-turbo" in str(refused.value)
    assert refused.value.response.headers["x-aibridge-request-id"]  # like every MITM'd answer
    assert upstream.requests == []
    chat(client, model="gpt-4o-mini")
    assert len(upstream.requests) == 1


_sly = itertools.count(1)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # Attacker review: the check read the first "model" in the bytes, the provider the
        # top-level key its parser keeps (the last of duplicates; an escaped key).
        ("/v1/chat/completions", b'{"model":"gpt-4o-mini","model":"o1-pro","messages":[]}'),
        ("/v1/chat/completions", b'{"metadata":{"model":"gpt-4o-mini"},"model":"o1-pro"}'),
        ("/v1/chat/completions", b'{"\\u006dodel":"o1-pro","metadata":{"model":"gpt-4o-mini"}}'),
        # A deployment named in the path (Azure serves it whatever the body says), a query.
        ("/openai/deployments/o1-pro/chat/completions?api-version=1", b'{"model":"gpt-4o"}'),
        ("/v1/chat/completions?model=o1-pro", b'{"model":"gpt-4o","messages":[]}'),
    ],
)
def test_every_model_a_request_names_must_pass_the_allow_list(
    daemon: DaemonProcess, upstream: FakeUpstream, path: str, body: bytes
) -> None:
    name = f"sly-{next(_sly)}"
    token = daemon.create_token(name)
    set_policy(daemon, "--user", name, "--models", "gpt-4o*")
    with daemon.httpx_client(token) as client:
        answer = client.post(
            f"https://api.openai.com{path}",
            content=body,
            headers={"content-type": "application/json", "authorization": "Bearer aibridgeproxyd"},
        )
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["code"] == "model_not_allowed"
    assert upstream.requests == []


def test_a_websocket_upgrade_must_name_an_allowed_model_under_an_allow_list(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    token = daemon.create_token("ws-user")
    set_policy(daemon, "--user", "ws-user", "--models", "gpt-4o*")
    upgrade = {
        "connection": "Upgrade",
        "upgrade": "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        "authorization": "Bearer aibridgeproxyd",
    }
    with daemon.httpx_client(token) as client:
        for query in ("", "?model=o1-pro"):
            answer = client.get(f"https://api.openai.com/v1/realtime{query}", headers=upgrade)
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"]["code"] == "model_not_allowed"
    assert upstream.requests == []


# --- rate limits --------------------------------------------------------------------------------


def test_rpm_gives_429_with_retry_after_until_the_minute_ends(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    token = daemon.create_token("rpm-user")
    set_policy(daemon, "--user", "rpm-user", "--rpm", "2")
    client = daemon.openai_client(token)
    before = refusals(daemon, "rpm_exceeded")
    avoid_minute_boundary(seconds_needed=15)
    for _ in range(2):
        chat(client)
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client)
    assert refused.value.code == "rpm_exceeded"
    retry_after = int(refused.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert len(upstream.requests) == 2
    assert refusals(daemon, "rpm_exceeded") == before + 1


def stream_request(token_client: httpx.Client, stream_id: str) -> Any:
    return token_client.stream(
        "POST",
        "https://api.openai.com/v1/chat/completions",
        json={
            "model": DEFAULT_OPENAI_MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
        headers={HEADER_STREAM_ID: stream_id, HEADER_EVENTS: "5"},
    )


def test_max_parallel_gives_429_while_a_stream_runs_and_frees_on_end_and_on_abort(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    token = daemon.create_token("parallel-user")
    set_policy(daemon, "--user", "parallel-user", "--max-parallel", "1")
    client = daemon.openai_client(token)
    for stream_id, abort in (("parallel-end", False), ("parallel-abort", True)):
        state = upstream.gate(stream_id)
        with daemon.httpx_client(token) as streaming, stream_request(streaming, stream_id) as held:
            assert held.status_code == 200
            with pytest.raises(openai.RateLimitError) as refused:
                chat(client)
            assert refused.value.code == "max_parallel_exceeded"
            assert refused.value.response.headers["retry-after"] == "1"
            if not abort:
                state.open_gate()
                held.read()
        # Ended, or abandoned mid-stream by its client: the slot is free again either way.
        daemon.wait_for(lambda: _admitted(client), message=f"a slot after {stream_id}")


def _admitted(client: openai.OpenAI) -> bool:
    try:
        chat(client)
    except openai.RateLimitError:
        return False
    return True


def test_a_streamed_requests_tokens_count_toward_tpm_and_the_budget(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    token = daemon.create_token("stream-user")
    set_policy(
        daemon, "--user", "stream-user", "--tpm", "10", "--budget-usd", "5", "--period", "week"
    )
    client = daemon.openai_client(token)
    avoid_minute_boundary(seconds_needed=15)  # the refusal and this_minute read one window
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage is not None
    tokens = usage.prompt_tokens + usage.completion_tokens  # cached reads are inside prompt
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client)
    assert refused.value.code == "tpm_exceeded"
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60
    scope = daemon.wait_for(
        lambda: (s := spend(daemon, "stream-user"))["spend"]["tokens"] and s,
        message="the stream's spend in the shared counters",
    )
    assert scope["spend"]["tokens"] == tokens
    assert scope["this_minute"]["tokens"] == tokens
    assert scope["spend"]["cost_usd"] == str(tokens / 1000)  # $0.001 a token
    assert scope["spend"]["period"] == "week"


def test_a_stream_that_does_not_ask_for_usage_still_counts_toward_the_budget(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    """Newcomer review: an OpenAI stream without stream_options.include_usage reports no
    tokens, so it used to spend nothing against a budget or tpm. For a user under either, the
    proxy asks for the usage (keeping the client's other stream options)."""
    token = daemon.create_token("quiet-streamer")
    set_policy(daemon, "--user", "quiet-streamer", "--budget-usd", "5", "--period", "day")
    client = daemon.openai_client(token)
    chunks = list(chat(client, stream=True, stream_options={"include_obfuscation": False}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    sent = json.loads(upstream.requests[-1].body)
    assert sent["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    scope = daemon.wait_for(
        lambda: (s := spend(daemon, "quiet-streamer"))["spend"]["tokens"] and s,
        message="the stream's spend in the shared counters",
    )
    assert scope["spend"]["tokens"] == usage.prompt_tokens + usage.completion_tokens
    # A user no budget or tpm limits gets the stream exactly as asked.
    free = daemon.create_token("free-streamer")
    list(chat(daemon.openai_client(free), stream=True))
    assert "stream_options" not in json.loads(upstream.requests[-1].body)


# --- management ---------------------------------------------------------------------------------


def test_a_policy_set_with_the_cli_applies_within_a_second(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    token = daemon.create_token("late-user")
    client = daemon.openai_client(token)
    chat(client)
    set_policy(daemon, "--user", "late-user", "--models", "claude-*")
    set_at = time.monotonic()
    daemon.wait_for(lambda: not _routed(client), timeout=1.0, message="the policy in force")
    assert time.monotonic() - set_at < 1.0
    daemon.cli("policies", "delete", "--user", "late-user", check=True)
    daemon.wait_for(lambda: _routed(client), timeout=1.0, message="the policy gone")


def _routed(client: openai.OpenAI) -> bool:
    try:
        chat(client)
    except openai.PermissionDeniedError:
        return False
    return True


def test_policies_cli_refuses_bad_input_naming_the_flag(daemon: DaemonProcess) -> None:
    for options, named in (
        (["--rpm", "many"], "--rpm"),
        (["--budget-usd", "5"], "--period"),
        (["--user", "no spaces", "--rpm", "1"], "--user"),
        (["--models", ""], "--models"),
        (["--budget-usd", "-1", "--period", "day"], "--budget-usd"),
    ):
        result = daemon.cli("policies", "set", *options)
        assert result.returncode == 2, options
        assert result.stderr.startswith(f"error: {named}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    listed = json.loads(daemon.cli("policies", "list", check=True).stdout)
    assert all(policy["user"] != "no spaces" for policy in listed)
