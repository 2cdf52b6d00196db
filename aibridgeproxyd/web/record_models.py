"""The data API's response bodies (CONTRACT 10.1 and 12) as Pydantic models: they write the
OpenAPI document, and each body is validated against them before it is sent.

Token counts and costs are null when nothing reported them (never 0); timestamps are RFC 3339
UTC text with milliseconds (``2026-11-26T17:33:00.123Z``); ``cost_micros`` is millionths of a
US dollar. The shapes come from the store (``Store.page_interceptions``, ``list_sessions``,
``get_session``, ``usage``) and ``aibridgeproxyd.sessions``.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class ToolCall(BaseModel):
    """A tool call of a response: the provider's id for it (null when it gave none), the tool's
    name and its input as JSON text (cut at ``record_max_bytes``)."""

    tool_call_id: str | None
    tool: str
    input: str


class Interception(BaseModel):
    """One interception record (CONTRACT 10.1; docs/monitoring.md#interception-records), with
    what was recorded with it."""

    id: str = Field(description="the request id, a UUID; the X-AIBridge-Request-Id header")
    connect_id: str
    initiator: str | None = Field(description="the proxy token's name")
    provider: str = Field(description="the provider's type")
    provider_name: str | None
    model: str | None
    client: str
    user_agent: str | None
    client_session_id: str | None
    session_id: str | None
    thread_parent_id: str | None
    thread_root_id: str | None
    credential_kind: str | None = Field(description="central, byok or signed")
    credential_hint: str | None = Field(description="the credential used, masked")
    method: str
    path: str
    status: int | None
    streamed: bool
    input_tokens: int | None
    output_tokens: int | None
    cache_read_input_tokens: int | None
    cache_creation_input_tokens: int | None
    reasoning_output_tokens: int | None
    cost_micros: int | None
    started_at: str
    ended_at: str
    ttfb_ms: float | None
    duration_ms: float
    error: str | None
    prompts: list[str]
    tool_calls: list[ToolCall]
    thoughts: list[str]


class InterceptionPage(BaseModel):
    """A page of interceptions, newest first; ``count`` is every match, not the page's size."""

    count: int
    results: list[Interception]


class TokenUsage(BaseModel):
    """Summed token counts; each null when no interception reported it."""

    input_tokens: int | None
    output_tokens: int | None
    cache_read_input_tokens: int | None
    cache_creation_input_tokens: int | None


class SessionFields(BaseModel):
    """What a session and its detail share."""

    id: str
    client: str | None = Field(description="the client of its latest interception")
    initiator: str | None
    providers: list[str] = Field(description="the distinct provider types")
    provider_names: list[str] = Field(description="the distinct provider names")
    models: list[str]
    started_at: str
    ended_at: str
    last_active_at: str = Field(description="when its latest interception started")
    last_prompt: str | None
    token_usage_summary: TokenUsage
    cost_micros: int | None


class Session(SessionFields):
    """A session in a list; ``threads`` is how many it has."""

    threads: int


class SessionPage(BaseModel):
    """A page of sessions, most recently active first; ``count`` is every match."""

    count: int
    sessions: list[Session]


class ThreadInterception(BaseModel):
    """An interception of a thread."""

    id: str
    model: str | None
    status: int | None
    error: str | None = Field(description="why it failed (the record's error), null if it did not")
    tool_calls: list[ToolCall]
    thoughts: list[str]
    token_usage: TokenUsage


class Thread(BaseModel):
    """A thread: an interception and those answering its tool calls, oldest first."""

    id: str = Field(description="its root interception's id")
    prompt: str | None
    model: str | None
    provider: str
    provider_name: str | None = Field(description="the name of its first interception's provider")
    started_at: str
    ended_at: str
    credential_kind: str | None
    credential_hint: str | None
    token_usage: TokenUsage
    interceptions: list[ThreadInterception]


class SessionDetail(SessionFields):
    """A session with its threads, oldest first."""

    threads: list[Thread]


class UsageGroup(BaseModel):
    """Usage of one group: ``key`` is the day (``YYYY-MM-DD``, UTC), provider type, provider
    name, model, initiator or client; null for records without that value."""

    key: str | None
    requests: int
    input_tokens: int | None
    output_tokens: int | None
    cache_read_input_tokens: int | None
    cache_creation_input_tokens: int | None
    cost_micros: int | None
