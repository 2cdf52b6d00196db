"""Structured interception logs (``log_interceptions: true``; docs/monitoring.md, "Structured
interception logs"): each interception as log records with the message ``interception log`` and
a ``record_type``, the six types of Coder's AI Gateway structured logging
(``coderd/aibridged/log_recorder.go``): ``interception_start``, ``interception_end``,
``token_usage``, ``prompt_usage``, ``tool_usage``, ``model_thought``.

Each record is a ``(record_type, fields)`` pair; ``emit_records`` logs them with the request's
``connect_id`` and ``request_id``, every string field passed through the request's secret
redaction first, so that no key or token can reach the log even if a client echoed one. The
``interception_id`` is the record's public id, its ``request_id``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aibridgeproxyd.errors import SecretRedactor
from aibridgeproxyd.interception.state import RequestContext
from aibridgeproxyd.interception.writer import rfc3339_ms
from aibridgeproxyd.model import InterceptionRecord

MESSAGE = "interception log"
# Named after what it logs, so that operators can route these lines on their own.
log = logging.getLogger("aibridgeproxyd.interceptions")

LogValue = str | int | float | bool | None
LogRecord = tuple[str, dict[str, LogValue]]

# The record's token counts, as named in the store and the token_usage record.
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_output_tokens",
)


def start_record(ctx: RequestContext) -> LogRecord:
    """``interception_start``, once the request is routed: who, which provider, the model
    asked for (None when the request names none), the client, and ``started_at`` (RFC 3339
    UTC). ``client_session_id`` only when known (``recording.client_session_id``)."""
    fields: dict[str, LogValue] = {
        "interception_id": ctx.request_id,
        "initiator": ctx.connect.identity,
        "provider": ctx.provider.type,
        "provider_name": ctx.provider.name,
        "model": ctx.recording.request_model,
        "client": ctx.recording.client,
        "user_agent": ctx.recording.user_agent,
        "method": ctx.recording.method,
        "path": ctx.recording.path,  # never the query string
        "started_at": rfc3339_ms(ctx.started),
    }
    if ctx.recording.client_session_id:
        fields["client_session_id"] = ctx.recording.client_session_id
    return "interception_start", fields


def finish_records(record: InterceptionRecord) -> list[LogRecord]:
    """The records of a finished interception, in this order: ``interception_end``, then
    ``token_usage`` (only when the upstream reported a count; an unreported count is left out,
    never 0), one ``prompt_usage`` for the recorded prompt, one ``tool_usage`` per tool call and
    one ``model_thought`` per thought. Times are RFC 3339 UTC, durations milliseconds, cost
    millionths of a US dollar; the credential is the record's masked hint, never the secret."""
    interception_id = record.request_id
    end: dict[str, LogValue] = {
        "interception_id": interception_id,
        "status": record.status,
        "error": record.error,
        "model": record.model,
        "ended_at": record.ended_at,
        "duration_ms": record.duration_ms,
        "ttfb_ms": record.ttfb_ms,
        "streamed": record.streamed,
        "cost_micros": record.cost_micros,
        "credential_kind": record.credential_kind,
        "credential_hint": record.credential_hint,
    }
    if record.client_session_id:
        end["client_session_id"] = record.client_session_id
    records: list[LogRecord] = [("interception_end", end)]
    counts = {name: getattr(record, name) for name in TOKEN_FIELDS}
    reported = {name: count for name, count in counts.items() if count is not None}
    if reported:
        usage: dict[str, LogValue] = {"interception_id": interception_id, "model": record.model}
        records.append(("token_usage", usage | reported))
    if record.prompt is not None:
        records.append(
            ("prompt_usage", {"interception_id": interception_id, "prompt": record.prompt})
        )
    records.extend(
        (
            "tool_usage",
            {
                "interception_id": interception_id,
                "tool_call_id": call.tool_call_id,
                "tool": call.tool,
                "input": call.input,
            },
        )
        for call in record.tool_calls
    )
    records.extend(
        ("model_thought", {"interception_id": interception_id, "content": thought})
        for thought in record.thoughts
    )
    return records


def emit_records(
    records: Iterable[LogRecord], ids: dict[str, str], redactor: SecretRedactor
) -> None:
    """Log each record at INFO as ``interception log`` with ``record_type``, ``ids`` (the
    request's ``connect_id`` and ``request_id``) and its fields; string fields pass through
    ``redactor`` (the request's secrets, ``recording.redactor_for``)."""
    if not log.isEnabledFor(logging.INFO):
        return
    for record_type, fields in records:
        extra: dict[str, LogValue] = {"record_type": record_type, **ids}
        for name, value in fields.items():
            extra[name] = (
                redactor.redact_text(value) if isinstance(value, str) and redactor else value
            )
        log.info(MESSAGE, extra=extra)
