"""Anthropic: the Messages API, authenticated with ``x-api-key``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aibridgeproxyd.adapters.base import Adapter
from aibridgeproxyd.model import ApiFormat

if TYPE_CHECKING:
    from mitmproxy import http


class AnthropicAdapter(Adapter):
    """Anthropic's own API: the key goes in ``x-api-key``; paths are kept as sent (no version
    prefix in the base URL)."""

    type_name = "anthropic"
    genai_provider_name = "anthropic"
    client_format = ApiFormat.ANTHROPIC
    default_hosts = ("api.anthropic.com",)
    default_base_url = "https://api.anthropic.com"
    # Anthropic base URLs exclude the version: clients send /v1/messages to the root.
    version_prefix = ""
    usage_formats = frozenset({ApiFormat.ANTHROPIC})  # clients speak only Messages
    default_display_name = "Anthropic"

    def inject_key(self, headers: http.Headers, key: str) -> None:
        # anthropic-version and anthropic-beta are the client's and stay as sent.
        headers["x-api-key"] = key
