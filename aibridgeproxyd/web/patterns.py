"""The patterns the API's schema puts on names, hosts and keys, and what each asks for in words.

The schema states the pattern, so a client (or schemathesis) can rely on it; a value that does
not match is answered with the words (``problems``), never with the regular expression alone,
and never with the value itself (it may be a key).
"""

from __future__ import annotations

from aibridgeproxyd.model import NAME_PATTERN
from aibridgeproxyd.store import TOKEN_NAME_PATTERN

PROVIDER_NAME = NAME_PATTERN.pattern
# A bare hostname, any case, an optional trailing dot (model.HOSTNAME_PATTERN before
# providers.normalize_host lower-cases it).
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOST = rf"^{_LABEL}(\.{_LABEL})*\.?$"
# A key travels in an HTTP header: visible ASCII, no spaces.
API_KEY = r"^[!-~]+$"
TOKEN_NAME = TOKEN_NAME_PATTERN.pattern
# A policy's user: a token's name, or * for the default of every user.
USER = rf"^(\*|{TOKEN_NAME.strip('^$')})$"

_TOKEN_NAME_WORDS = (
    "letters, digits and . _ @ + - (starting with a letter or digit, at most 128 characters)"
)
MEANINGS = {
    PROVIDER_NAME: f"expected a provider name like openai-eu: a-z, 0-9, '-' ({PROVIDER_NAME})",
    HOST: (
        "expected a bare hostname like api.openai.com (letters, digits, '-' and '.'; IDNA "
        "names in their xn-- form); wildcards such as *.example.com are not supported: list "
        "each host"
    ),
    API_KEY: "a key may hold only visible ASCII characters: no spaces, control or non-ASCII",
    TOKEN_NAME: f"expected a token name: {_TOKEN_NAME_WORDS}",
    USER: f"expected * (the default of every user) or a token name: {_TOKEN_NAME_WORDS}",
}
