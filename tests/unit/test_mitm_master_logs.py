"""mitmproxy's log lines the daemon says again itself are dropped (``drop_repeated_logs``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from aibridgeproxyd.mitm.master import drop_repeated_logs

TLS_LINE = ("mitmproxy.proxy.server", "Server TLS handshake failed. Certificate verify failed")
LISTEN_LINE = ("mitmproxy.addons.proxyserver", "HTTP(S) proxy failed to listen on *:8888")


@pytest.fixture
def kept() -> Iterator[None]:
    """The two loggers' filters as they were, put back after the test."""
    loggers = [logging.getLogger(name) for name, _ in (TLS_LINE, LISTEN_LINE)]
    saved = [list(logger.filters) for logger in loggers]
    yield
    for logger, filters in zip(loggers, saved, strict=True):
        logger.filters[:] = filters


def passes(name: str, message: str) -> bool:
    record = logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)
    return bool(logging.getLogger(name).filter(record))


@pytest.mark.usefixtures("kept")
def test_a_failed_upstream_handshake_is_dropped_below_debug_and_kept_at_debug() -> None:
    drop_repeated_logs(debug=False)
    assert not passes(*TLS_LINE)
    assert passes("mitmproxy.proxy.server", "Client TLS handshake failed.")
    drop_repeated_logs(debug=True)  # replaces the filters: not one more on top
    assert passes(*TLS_LINE)


@pytest.mark.usefixtures("kept")
def test_a_bind_failure_is_dropped_at_every_level() -> None:
    for debug in (False, True):
        drop_repeated_logs(debug=debug)
        assert not passes(*LISTEN_LINE)
    assert len(logging.getLogger(LISTEN_LINE[0]).filters) == 1
