"""The one place that reads and removes client credentials from request headers (section 6.5)."""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum

from mitmproxy.http import Headers

# Every header a client may carry a provider credential in.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")


class CredentialMode(StrEnum):
    CENTRAL = "central"  # the proxy injects the provider's key
    BYOK = "byok"  # the client's own key is passed through


def credential_values(headers: Headers) -> Iterator[tuple[str, str]]:
    """(header name, credential) pairs; ``Authorization: Bearer X`` yields X."""
    for name in CREDENTIAL_HEADERS:
        for value in headers.get_all(name):
            value = value.strip()
            if name == "authorization" and value[:7].lower() == "bearer ":
                value = value[7:].strip()
            yield name, value


def credential_mode(headers: Headers, proxy_token: str | None, placeholder: str) -> CredentialMode:
    """Central when every credential is absent, the caller's proxy token, or the placeholder."""
    central_values = {"", placeholder}
    if proxy_token:
        central_values.add(proxy_token)
    for _, value in credential_values(headers):
        if value not in central_values:
            return CredentialMode.BYOK
    return CredentialMode.CENTRAL


def remove_all_credentials(headers: Headers) -> None:
    for name in CREDENTIAL_HEADERS:
        headers.pop(name, None)


def remove_proxy_credentials(headers: Headers, proxy_token: str | None, placeholder: str) -> None:
    """Drop any credential header that carries the proxy token or the placeholder, so the
    proxy token never reaches an upstream even when the client mixes it with its own key."""
    doomed = {placeholder} | ({proxy_token} if proxy_token else set())
    for name, value in list(credential_values(headers)):
        if value in doomed:
            headers.pop(name, None)
