"""The masked credential of an interception record (CONTRACT 10.1 ``credential_hint``): what
is shown of a secret, whatever its length, and which credential of a request is hinted."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.http import Headers

from aibridgeproxyd.credentials import client_credential_hint, mask_secret

# Header values are latin-1 text (mitmproxy decodes them so): every character a secret can have.
LATIN1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF)


@pytest.mark.parametrize(
    ("secret", "hint"),
    [
        ("sk-proj-0123456789abcdefABCD", "sk-\u2026ABCD"),
        ("sk-ant-api03-xyz-WXYZ", "sk-\u2026WXYZ"),
        ("0123456789abc", "012\u20269abc"),  # 13 characters: long
        ("abcdefghij12", "\u202612"),  # 12 characters: short, at most the last 2
        ("abcdefg8", "\u2026g8"),
        ("short", "\u2026"),
        ("", "\u2026"),
    ],
)
def test_a_secret_shows_at_most_four_characters_of_each_end_and_fewer_when_short(
    secret: str, hint: str
) -> None:
    assert mask_secret(secret) == hint


@given(st.text(LATIN1, max_size=200))
def test_no_five_consecutive_characters_of_a_secret_appear_in_its_hint(secret: str) -> None:
    hint = mask_secret(secret)
    assert all(secret[i : i + 5] not in hint for i in range(max(len(secret) - 4, 0)))
    if len(secret) <= 12:
        assert len(hint.replace("\u2026", "")) <= 2


@given(st.text(max_size=60))
def test_a_secret_of_any_characters_never_shows_five_in_a_row(secret: str) -> None:
    # Not a header value, yet still masked safely: the ellipsis in a secret hides it whole.
    hint = mask_secret(secret)
    assert all(secret[i : i + 5] not in hint for i in range(max(len(secret) - 4, 0)))


def test_the_client_hint_masks_the_first_credential_a_request_carries() -> None:
    assert client_credential_hint(Headers(authorization="Bearer sk-client-0123456789WXYZ")) == (
        "sk-\u2026WXYZ"
    )
    assert client_credential_hint(Headers([(b"x-api-key", b"sk-ant-key-00000000LAST")])) == (
        "sk-\u2026LAST"
    )
    assert client_credential_hint(Headers(accept="*/*")) is None
