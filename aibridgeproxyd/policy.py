"""Policies (docs/policies.md, CONTRACT 15): the record as stored, its validation, and how the
policies of a user, the default and a provider resolve into the limits in force.

Nothing here does IO. A ``Policy`` is one row: a subject (a user's proxy-token name, or None for
the default of every user) and an optional provider (None: every provider), with any of a
budget (``max_cost_usd`` and/or ``max_tokens`` per ``period``), a model allow-list (glob
patterns), ``rpm``, ``tpm`` and ``max_parallel``. Unset fields (None) do not limit.

Resolution (``resolve``), for a request of user U to provider P:

1. **All-provider scope.** Each limit is U's own value when U's policy (provider None) sets it,
   else the default policy's. The budget is one limit (cost, tokens and period together): U's
   budget replaces the default's whole, never mixed with it. So a user's policy can loosen the
   default as well as tighten it: the most specific policy applies.
2. **Provider scope.** The same rule between U's policy for P and the default policy for P.
   Its limits apply *in addition* to the all-provider ones and count only P's traffic: its
   budget counts spend at P, its rpm requests to P, and so on.
3. A request must pass every limit of both scopes: where both set one, the stricter wins. A
   model must match an allow-list pattern of each scope that has one.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")
Window = Literal["minute", "day", "week", "month"]
# Every counter window: the rpm/tpm minute, then the budget periods.
WINDOWS: tuple[Window, ...] = ("minute", "day", "week", "month")
# Stored in the subject and provider columns for "every user" / "every provider": never a
# token name (those start with a letter or digit) nor a provider name.
EVERYONE = "*"
# Bounds, so that one policy cannot hold unbounded memory or an absurd number.
MAX_MODEL_PATTERNS = 100
MAX_PATTERN_LENGTH = 256
MAX_LIMIT = 10**12
MAX_COST_USD = Decimal(10**9)
_SUBJECT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_PROVIDER_PATTERN = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
MICROS_PER_USD = 1_000_000


class PolicyError(ValueError):
    """A policy that cannot be stored; ``field`` names the offending field (as in the API)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Policy:
    """One policy as stored. ``user`` None is the default of every user; ``provider`` None
    applies to every provider. ``max_cost_usd`` is in US dollars (exact decimal), ``max_tokens``
    counts every token of a response (``tokens_of``), both per ``period`` (UTC calendar day,
    ISO week from Monday, month). ``models``: glob patterns (``fnmatch``, case-sensitive) of
    the allowed model names; None allows every model. ``rpm``/``tpm``: requests/tokens per UTC
    minute; ``max_parallel``: requests in flight at once."""

    user: str | None = None
    provider: str | None = None
    max_cost_usd: Decimal | None = None
    max_tokens: int | None = None
    period: Period | None = None
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    created_at: str = ""
    updated_at: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """``(subject, provider)`` as stored: ``EVERYONE`` for None."""
        return (self.user or EVERYONE, self.provider or EVERYONE)

    @property
    def has_budget(self) -> bool:
        return self.max_cost_usd is not None or self.max_tokens is not None

    def to_json(self) -> dict[str, Any]:
        """The policy as the CLI and the API show it: ``max_cost_usd`` as a decimal string."""
        return {
            "user": self.user,
            "provider": self.provider,
            "max_cost_usd": None if self.max_cost_usd is None else str(self.max_cost_usd),
            "max_tokens": self.max_tokens,
            "period": self.period,
            "models": None if self.models is None else list(self.models),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_parallel": self.max_parallel,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def validate_policy(policy: Policy) -> Policy:
    """``policy`` checked (``PolicyError`` naming the field) and normalised: the cost as an
    exact decimal, duplicate model patterns dropped. At least one limit must be set, and a
    budget needs a period (and a period a budget)."""
    _check_names(policy)
    cost = _check_cost(policy.max_cost_usd)
    for name in ("max_tokens", "rpm", "tpm", "max_parallel"):
        _check_count(name, getattr(policy, name), minimum=0 if name == "max_tokens" else 1)
    if (cost is not None or policy.max_tokens is not None) != (policy.period is not None):
        raise PolicyError(
            "a budget (max_cost_usd or max_tokens) needs a period (day, week or month), "
            "and a period needs a budget",
            "period",
        )
    if policy.period is not None and policy.period not in PERIODS:
        raise PolicyError(f"invalid period {policy.period!r}: use day, week or month", "period")
    models = None if policy.models is None else _check_models(policy.models)
    checked = replace(policy, max_cost_usd=cost, models=models)
    if not _limits_set(checked):
        raise PolicyError(
            "a policy needs at least one limit: a budget, models, rpm, tpm or max_parallel",
            "policy",
        )
    return checked


def _check_names(policy: Policy) -> None:
    if policy.user is not None and not _SUBJECT_PATTERN.fullmatch(policy.user):
        raise PolicyError(
            f"invalid user {policy.user[:128]!r}: a proxy token's name (letters, digits and "
            ". _ @ + -, starting with a letter or digit, at most 128 characters)",
            "user",
        )
    if policy.provider is not None and not _PROVIDER_PATTERN.fullmatch(policy.provider):
        raise PolicyError(
            f"invalid provider name {policy.provider[:128]!r}: lower-case letters, digits "
            "and single dashes",
            "provider",
        )


def _check_cost(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        cost = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except InvalidOperation:
        raise PolicyError(
            f"invalid max_cost_usd {str(value)[:40]!r}: a number of US dollars", "max_cost_usd"
        ) from None
    if isinstance(value, bool) or not cost.is_finite() or cost < 0 or cost > MAX_COST_USD:
        raise PolicyError(
            f"invalid max_cost_usd {str(value)[:40]!r}: between 0 and {MAX_COST_USD} US dollars",
            "max_cost_usd",
        )
    exponent = cost.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -6:
        # Spend is counted in millionths of a dollar (cost_micros): a finer budget could
        # never be met exactly, and the CLI, the dashboard and the API must agree.
        raise PolicyError(
            f"invalid max_cost_usd {str(value)[:40]!r}: at most 6 decimal places "
            "(spend is counted in millionths of a US dollar)",
            "max_cost_usd",
        )
    # Plain decimal text whatever was typed (1E+2 is 100, 0.50 stays 0.50, -0 is 0).
    return Decimal(f"{cost:f}") if cost != 0 else Decimal(0)


def _check_count(name: str, value: Any, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_LIMIT:
        raise PolicyError(
            f"invalid {name} {str(value)[:40]!r}: a whole number from {minimum} to {MAX_LIMIT}",
            name,
        )


def _check_models(models: Sequence[Any]) -> tuple[str, ...]:
    if isinstance(models, str) or not models or len(models) > MAX_MODEL_PATTERNS:
        raise PolicyError(
            f"models must be a list of 1 to {MAX_MODEL_PATTERNS} glob patterns "
            "(such as claude-*); leave it unset to allow every model",
            "models",
        )
    for pattern in models:
        if (
            not isinstance(pattern, str)
            or not pattern
            or pattern != pattern.strip()
            or not pattern.isprintable()
            or len(pattern) > MAX_PATTERN_LENGTH
        ):
            raise PolicyError(
                f"invalid model pattern {str(pattern)[:MAX_PATTERN_LENGTH]!r}: printable, no "
                f"surrounding spaces, 1 to {MAX_PATTERN_LENGTH} characters",
                "models",
            )
    return tuple(dict.fromkeys(models))


def _limits_set(policy: Policy) -> bool:
    return policy.has_budget or any(
        getattr(policy, name) is not None for name in ("models", "rpm", "tpm", "max_parallel")
    )


# --- resolution -------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """A budget in force: at most ``max_cost_micros`` (millionths of a USD) and/or
    ``max_tokens`` per ``period``."""

    period: Period
    max_cost_micros: int | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class ScopeLimits:
    """The limits in force in one scope: ``provider`` None counts all of a user's traffic, a
    provider name only that provider's. ``sources`` maps each limit set here (``budget``,
    ``models``, ``rpm``, ``tpm``, ``max_parallel``) to the policy it came from: ``"user"`` or
    ``"default"``."""

    provider: str | None
    budget: Budget | None = None
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.sources


@dataclass(frozen=True)
class EffectivePolicy:
    """What applies to ``user``'s requests to ``provider`` (None: the all-provider scope only):
    every scope in ``scopes`` must pass. Empty ``scopes``: nothing limits the user."""

    user: str
    provider: str | None
    scopes: tuple[ScopeLimits, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """For the CLI and the API: each scope's limits, the cost in USD as a decimal string."""
        return {
            "user": self.user,
            "provider": self.provider,
            "scopes": [scope_json(scope) for scope in self.scopes],
        }


def scope_json(scope: ScopeLimits) -> dict[str, Any]:
    """One scope's limits as JSON (``EffectivePolicy.to_json``, the spend report)."""
    budget = scope.budget
    return {
        "provider": scope.provider,
        "budget": None
        if budget is None
        else {
            "period": budget.period,
            "max_cost_usd": None
            if budget.max_cost_micros is None
            else str(Decimal(budget.max_cost_micros) / MICROS_PER_USD),
            "max_tokens": budget.max_tokens,
        },
        "models": None if scope.models is None else list(scope.models),
        "rpm": scope.rpm,
        "tpm": scope.tpm,
        "max_parallel": scope.max_parallel,
        "sources": dict(scope.sources),
    }


PolicyIndex = Mapping[tuple[str, str], Policy]


def index_policies(policies: Iterable[Policy]) -> dict[tuple[str, str], Policy]:
    """Policies by ``(subject, provider)`` (``Policy.key``), as ``resolve`` reads them."""
    return {policy.key: policy for policy in policies}


def resolve(policies: PolicyIndex, user: str, provider: str | None = None) -> EffectivePolicy:
    """The limits in force for ``user`` (a proxy-token name; ``""`` for a request without a
    token, which only the default policies limit) at ``provider``: see the module docstring."""
    if not policies:
        return EffectivePolicy(user, provider)  # the common case: two dict probes spared
    scopes = [_combine(policies, user, EVERYONE, None)]
    if provider is not None:
        scopes.append(_combine(policies, user, provider, provider))
    return EffectivePolicy(user, provider, tuple(scope for scope in scopes if not scope.empty))


_LIMIT_FIELDS = ("models", "rpm", "tpm", "max_parallel")


def _combine(policies: PolicyIndex, user: str, column: str, provider: str | None) -> ScopeLimits:
    """One scope: each limit from the user's policy when it sets it, else the default's."""
    own = policies.get((user, column)) if user else None
    default = policies.get((EVERYONE, column))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, policy in (("default", default), ("user", own)):
        if policy is None:
            continue
        if policy.has_budget:
            values["budget"], sources["budget"] = _budget(policy), name
        for limit in _LIMIT_FIELDS:
            if (value := getattr(policy, limit)) is not None:
                values[limit], sources[limit] = value, name
    return ScopeLimits(provider, sources=sources, **values)


def _budget(policy: Policy) -> Budget:
    assert policy.period is not None, "validated: a budget has a period"
    cost = policy.max_cost_usd
    micros = None if cost is None else int(cost * MICROS_PER_USD)
    return Budget(policy.period, micros, policy.max_tokens)


def model_allowed(scopes: Iterable[ScopeLimits], model: str | None) -> bool:
    """Whether ``model`` matches an allow-list pattern of every scope that has one. An
    unknown model (None) passes no allow-list: the caller decides whether that request needs a
    model at all."""
    for scope in scopes:
        if scope.models is None:
            continue
        if model is None or not any(fnmatch.fnmatchcase(model, p) for p in scope.models):
            return False
    return True


# --- UTC calendar periods ------------------------------------------------------------------


def period_start(period: Window, now: datetime) -> datetime:
    """The start (UTC) of the calendar ``period`` containing ``now``: the minute, the day, the
    ISO week (Monday 00:00) or the month."""
    now = now.astimezone(UTC)
    if period == "minute":
        return now.replace(second=0, microsecond=0)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def period_end(period: Window, now: datetime) -> datetime:
    """The end (exclusive) of the period containing ``now``: the next period's start."""
    start = period_start(period, now)
    if period == "minute":
        return start + timedelta(minutes=1)
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    return (start + timedelta(days=32)).replace(day=1)


def period_key(period: Window, now: datetime) -> str:
    """The counter key of the period containing ``now``, e.g. ``day:2026-11-29``,
    ``week:2026-11-23`` (its Monday), ``month:2026-11``, ``minute:2026-11-29T23:50``."""
    start = period_start(period, now)
    if period == "minute":
        return f"minute:{start:%Y-%m-%dT%H:%M}"
    if period == "month":
        return f"month:{start:%Y-%m}"
    return f"{period}:{start:%Y-%m-%d}"
