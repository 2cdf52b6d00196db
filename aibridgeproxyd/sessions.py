"""Sessions and threads as the CLI and the data API show them (CONTRACT 12), built from rows.

No IO and no SQL: ``Store.list_sessions`` and ``Store.get_session`` read the rows (store.py is
the only module that speaks SQL) and hand them to these functions, so ``aibridgeproxyd sessions``
and ``GET /api/v2/aibridge/sessions`` return the same shapes from the same calls.

A session is every interception with one ``session_id``; a thread is every interception of a
session with one ``thread_root_id`` (docs/monitoring.md#sessions-and-threads). Token counts are
summed; a count no interception reported stays null, never 0. ``cost_micros`` sums the priced
interceptions (null when none was priced).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


def token_usage(*counts: int | None) -> dict[str, int | None]:
    """``{input_tokens, output_tokens, cache_read_input_tokens, cache_creation_input_tokens}``
    from the four counts in that order."""
    return dict(zip(TOKEN_FIELDS, counts, strict=True))


@dataclass
class Children:
    """The prompts, tool calls and thoughts of some interceptions, by interception id, each a
    list of column values in the order recorded (``Store`` fills it)."""

    prompts: dict[str, list[list[Any]]] = field(default_factory=dict)
    tool_calls: dict[str, list[list[Any]]] = field(default_factory=dict)
    thoughts: dict[str, list[list[Any]]] = field(default_factory=dict)

    def of(self, interception_id: str) -> dict[str, list[Any]]:
        """``{prompts: [text], tool_calls: [{tool_call_id, tool, input}], thoughts: [text]}``."""
        return {
            "prompts": [text for (text,) in self.prompts.get(interception_id, ())],
            "tool_calls": self.tool_calls_of(interception_id),
            "thoughts": self.thoughts_of(interception_id),
        }

    def tool_calls_of(self, interception_id: str) -> list[dict[str, Any]]:
        return [
            {"tool_call_id": tool_call_id, "tool": tool, "input": tool_input}
            for tool_call_id, tool, tool_input in self.tool_calls.get(interception_id, ())
        ]

    def thoughts_of(self, interception_id: str) -> list[str]:
        return [text for (text,) in self.thoughts.get(interception_id, ())]

    def first_prompt(self, interception_id: str) -> str | None:
        found = self.prompts.get(interception_id)
        return found[0][0] if found else None


class SessionAggregate(NamedTuple):
    """One session's aggregates over all its interceptions (one row of the store's query)."""

    id: str
    started_at: str  # the first interception's start
    last_active_at: str  # the latest interception's start
    ended_at: str  # the latest end
    threads: int  # distinct thread roots
    input_tokens: int | None
    output_tokens: int | None
    cache_read_input_tokens: int | None
    cache_creation_input_tokens: int | None
    cost_micros: int | None
    providers: str  # a JSON array of distinct provider types, in no order
    models: str  # a JSON array of distinct models, null included, in no order
    provider_names: str  # a JSON array of distinct provider names, null included, in no order


def session_summary(
    aggregate: SessionAggregate, latest: str | None, last_prompt: str | None
) -> dict[str, Any]:
    """A session as ``sessions list`` shows it: ``{id, client, initiator, providers,
    provider_names, models,
    started_at, ended_at, last_active_at, last_prompt, threads, token_usage_summary,
    cost_micros}``. ``latest`` is the JSON array ``[client, initiator]`` of the session's latest
    interception; ``last_prompt`` the latest prompt recorded in the session (null if none)."""
    client, initiator = json.loads(latest) if latest else (None, None)
    return {
        "id": aggregate.id,
        "client": client,
        "initiator": initiator,
        "providers": _sorted_values(aggregate.providers),
        "provider_names": _sorted_values(aggregate.provider_names),
        "models": _sorted_values(aggregate.models),
        "started_at": aggregate.started_at,
        "ended_at": aggregate.ended_at,
        "last_active_at": aggregate.last_active_at,
        "last_prompt": last_prompt,
        "threads": aggregate.threads,
        "token_usage_summary": token_usage(
            aggregate.input_tokens,
            aggregate.output_tokens,
            aggregate.cache_read_input_tokens,
            aggregate.cache_creation_input_tokens,
        ),
        "cost_micros": aggregate.cost_micros,
    }


def _sorted_values(json_array: str) -> list[str]:
    return sorted(value for value in json.loads(json_array) if value is not None)


class SessionInterception(NamedTuple):
    """An interception as a session's detail needs it (one row of the store's query)."""

    id: str  # request_id
    thread_root_id: str
    model: str | None
    provider: str
    provider_name: str | None
    status: int | None
    error: str | None
    started_at: str
    ended_at: str
    credential_kind: str | None
    credential_hint: str | None
    input_tokens: int | None
    output_tokens: int | None
    cache_read_input_tokens: int | None
    cache_creation_input_tokens: int | None


def session_threads(
    interceptions: Iterable[SessionInterception], children: Children
) -> list[dict[str, Any]]:
    """The threads of a session, oldest first, from its interceptions in the order they
    started: ``[{id, prompt, model, provider, provider_name, started_at, ended_at,
    credential_kind, credential_hint, token_usage, interceptions: [{id, model, status, error,
    tool_calls, thoughts, token_usage}]}]``. A thread's ``id`` is its root interception's id;
    its prompt is the first prompt recorded in it (the human one that started it), and its
    model, provider and credential those of its first interception."""
    threads: dict[str, dict[str, Any]] = {}
    for row in interceptions:
        thread = threads.get(row.thread_root_id)
        if thread is None:
            thread = threads[row.thread_root_id] = {
                "id": row.thread_root_id,
                "prompt": None,
                "model": row.model,
                "provider": row.provider,
                "provider_name": row.provider_name,
                "started_at": row.started_at,
                "ended_at": row.ended_at,
                "credential_kind": row.credential_kind,
                "credential_hint": row.credential_hint,
                "token_usage": token_usage(None, None, None, None),
                "interceptions": [],
            }
        thread["prompt"] = thread["prompt"] or children.first_prompt(row.id)
        thread["ended_at"] = max(thread["ended_at"], row.ended_at)
        usage = token_usage(*row[-4:])
        thread["token_usage"] = _added(thread["token_usage"], usage)
        thread["interceptions"].append(
            {
                "id": row.id,
                "model": row.model,
                "status": row.status,
                "error": row.error,
                "tool_calls": children.tool_calls_of(row.id),
                "thoughts": children.thoughts_of(row.id),
                "token_usage": usage,
            }
        )
    return list(threads.values())


def _added(total: dict[str, int | None], more: dict[str, int | None]) -> dict[str, int | None]:
    """Counts added key by key; null only where both are null (nothing reported)."""
    return {
        key: None
        if total[key] is None and more[key] is None
        else (total[key] or 0) + (more[key] or 0)
        for key in total
    }
