"""The Policies page's pure parts: the "Set a policy" form read into a ``Policy`` (and a stored
policy shown in it again), and users' reports (``management.budget_reports``) as the rows of
the spend table.

Form fields (all text, as a browser sends them): ``user`` (empty or ``*``: the default of every
user), ``provider`` (empty: every provider), ``max_cost_usd`` (US dollars), ``max_tokens``,
``period`` (``day``/``week``/``month``, empty without a budget), ``models`` (glob patterns
separated by commas or new lines), ``rpm``, ``tpm``, ``max_parallel``. An empty field does
not limit. A value that is not a number is a ``FormProblem`` naming the field; the rest is
checked by ``policy.validate_policy`` when the store writes it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from aibridgeproxyd.policy import EVERYONE, Policy
from aibridgeproxyd.web.provider_form import FormProblem

FORM_FIELDS = (
    "user",
    "provider",
    "max_cost_usd",
    "max_tokens",
    "period",
    "models",
    "rpm",
    "tpm",
    "max_parallel",
)
LABELS = {
    "user": "User",
    "provider": "Provider",
    "max_cost_usd": "Budget (USD)",
    "max_tokens": "Budget (tokens)",
    "period": "Period",
    "models": "Allowed models",
    "rpm": "Requests per minute",
    "tpm": "Tokens per minute",
    "max_parallel": "Parallel requests",
    "policy": "Policy",
}
# Far longer than any real form value; a longer one is refused before it is read.
MAX_FIELD_LENGTH = 30_000
# At this share of a budget, its bar turns to a warning (the alert docs/policies.md suggests).
WARN_FRACTION = 0.85
_COUNT_SEPARATORS = re.compile(r"[\s,_]")


def policy_from_form(form: Mapping[str, str]) -> Policy:
    """The policy a submitted form describes. Raises ``FormProblem`` naming the field whose
    text is too long or not a number."""
    text = {name: _text(form, name) for name in FORM_FIELDS}
    models = [m.strip() for m in re.split(r"[,\n]", text["models"]) if m.strip()]
    return Policy(
        user=None if text["user"] in ("", EVERYONE) else text["user"],
        provider=text["provider"] or None,
        max_cost_usd=_cost(text["max_cost_usd"]),
        max_tokens=_count("max_tokens", text["max_tokens"]),
        period=text["period"] or None,  # type: ignore[arg-type]  # validate_policy checks it
        models=tuple(models) or None,
        rpm=_count("rpm", text["rpm"]),
        tpm=_count("tpm", text["tpm"]),
        max_parallel=_count("max_parallel", text["max_parallel"]),
    )


def _text(form: Mapping[str, str], name: str) -> str:
    value = form.get(name, "")
    if len(value) > MAX_FIELD_LENGTH:
        raise FormProblem(name, f"longer than {MAX_FIELD_LENGTH} characters")
    return value.strip()


def _cost(text: str) -> Decimal | None:
    if not text:
        return None
    try:
        cost = Decimal(text.removeprefix("$").replace(",", ""))
    except InvalidOperation:
        raise FormProblem("max_cost_usd", f"{text[:40]!r} is not an amount of US dollars") from None
    if not cost.is_finite():
        raise FormProblem("max_cost_usd", f"{text[:40]!r} is not an amount of US dollars")
    return cost


def _count(name: str, text: str) -> int | None:
    if not text:
        return None
    digits = _COUNT_SEPARATORS.sub("", text)
    if not digits.isascii() or not digits.isdigit():
        raise FormProblem(name, f"{text[:40]!r} is not a whole number")
    return int(digits)


def form_values(policy: Mapping[str, Any] | None) -> dict[str, str]:
    """A policy's view (``Policy.to_json``) as the form's text fields; all empty for None."""
    if policy is None:
        return dict.fromkeys(FORM_FIELDS, "")
    values = {name: "" if policy.get(name) is None else str(policy[name]) for name in FORM_FIELDS}
    values["user"] = policy.get("user") or ""
    values["models"] = ", ".join(policy.get("models") or ())
    return values


# --- the spend table -----------------------------------------------------------------------


@dataclass(frozen=True)
class SpendRow:
    """One scope of one user as the table shows it. ``fraction`` is the share of the budget
    used (None without a budget; may pass 1), ``level`` ``ok``, ``warn`` (from
    ``WARN_FRACTION``) or ``over`` (1 and more); ``sources`` names each limit's policy."""

    user: str
    provider: str | None
    budget: Mapping[str, Any] | None
    spend: Mapping[str, Any] | None
    models: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    sources: Mapping[str, str]

    @property
    def fraction(self) -> float | None:
        return None if self.spend is None else float(self.spend["fraction_used"])

    @property
    def percent(self) -> str:
        """The share used as text: ``42%``, ``<1%`` for a little, empty without a budget."""
        if self.fraction is None:
            return ""
        if 0 < self.fraction < 0.01:
            return "<1%"
        return f"{self.fraction * 100:.0f}%"

    @property
    def level(self) -> str:
        fraction = self.fraction or 0.0
        return "over" if fraction >= 1 else "warn" if fraction >= WARN_FRACTION else "ok"


def spend_rows(reports: list[dict[str, Any]]) -> list[SpendRow]:
    """Every scope of every report, in order; a user without a scope gets one empty row (so
    every user is listed, with nothing limiting them)."""
    return list(_rows(reports))


def _rows(reports: list[dict[str, Any]]) -> Iterator[SpendRow]:
    for report in reports:
        if not report["scopes"]:
            yield SpendRow(report["user"], None, None, None, None, None, None, None, {})
        for scope in report["scopes"]:
            yield SpendRow(
                user=report["user"],
                provider=scope["provider"],
                budget=scope["budget"],
                spend=scope["spend"],
                models=None if scope["models"] is None else tuple(scope["models"]),
                rpm=scope["rpm"],
                tpm=scope["tpm"],
                max_parallel=scope["max_parallel"],
                sources=scope["sources"],
            )


def dollars(amount: str | None) -> str:
    """A decimal string of US dollars as text: cents (``$12.50``, ``$0.40``) unless that would
    hide a smaller amount (``$0.0042``); empty for None."""
    if amount is None:
        return ""
    value = Decimal(amount)
    cents = value.quantize(Decimal("0.01"))
    return f"${value:,.2f}" if value == cents or abs(value) >= 1 else f"${value:,.4f}"
