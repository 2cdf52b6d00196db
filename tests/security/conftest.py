"""Fixtures the security modules share, on top of ``tests/conftest.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.misbehaving import MisbehavingUpstream


@pytest.fixture(scope="module")
def misbehaving() -> Iterator[MisbehavingUpstream]:
    """An upstream that answers every request 400 with a JSON body quoting the request's headers
    back (``mode="echo"``), as some gateways do."""
    with MisbehavingUpstream(mode="echo") as fake:
        yield fake
