"""Google Gemini API: the native API and its OpenAI-compatible endpoints on one host.

Native paths (``/v1beta/models/<m>:generateContent``, ``:streamGenerateContent?alt=sse``, files,
caches, ...) authenticate with ``x-goog-api-key``; the OpenAI-compatible ones under
``/v1beta/openai/`` with ``Authorization: Bearer``. Paths are kept as sent. Errors the proxy
originates take the shape of the API the client is speaking.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from aibridgeproxyd.adapters.base import Adapter, ResponseTransform
from aibridgeproxyd.model import ApiFormat, Provider

if TYPE_CHECKING:
    from mitmproxy import http

API_KEY_HEADER = "x-goog-api-key"
_OPENAI_COMPATIBLE_PATH = re.compile(r"/v\d+(?:alpha|beta)?\d*/openai(?:/|$)")
# Native paths name the model: /v1beta/models/<model>:generateContent
_PATH_MODEL = re.compile(r"/models/([^/:?]+):")


def is_openai_compatible(request: http.Request) -> bool:
    return _OPENAI_COMPATIBLE_PATH.search(request.path.partition("?")[0]) is not None


class GoogleAdapter(Adapter):
    """Gemini: the key goes in ``x-goog-api-key`` (native) or ``Authorization`` (OpenAI-compatible
    paths); the model is read from a native path."""

    type_name = "google"
    genai_provider_name = "gcp.gemini"
    client_format = ApiFormat.GEMINI
    default_hosts = ("generativelanguage.googleapis.com",)
    default_base_url = "https://generativelanguage.googleapis.com"
    # Gemini paths carry their own version (/v1beta, /v1, /upload/v1beta): never stripped.
    version_prefix = ""

    def request_model(self, request: http.Request) -> str | None:
        if match := _PATH_MODEL.search(request.path):
            return match.group(1)
        return super().request_model(request)

    def error_format(self, request: http.Request) -> ApiFormat:
        return ApiFormat.OPENAI if is_openai_compatible(request) else ApiFormat.GEMINI

    def normalize_credentials(self, request: http.Request) -> None:
        # Gemini also takes the key as ?key=. Moved into x-goog-api-key, it is judged like any
        # credential (proxy token or placeholder: central key; anything else: BYOK), and the
        # query string can never carry the proxy token upstream.
        keys = request.query.get_all("key")
        if not keys:
            return
        del request.query["key"]
        if API_KEY_HEADER not in request.headers:
            request.headers[API_KEY_HEADER] = keys[0]

    def rewrite(
        self, request: http.Request, provider: Provider, key: str | None
    ) -> ResponseTransform | None:
        transform = super().rewrite(request, provider, None)
        if key is not None:
            _set_key(request.headers, key, bearer=is_openai_compatible(request))
        return transform

    def inject_key(self, headers: http.Headers, key: str) -> None:
        # On failover only the headers are at hand: keep the style rewrite chose for the path.
        _set_key(headers, key, bearer="authorization" in headers)


def _set_key(headers: http.Headers, key: str, *, bearer: bool) -> None:
    if bearer:
        headers["authorization"] = f"Bearer {key}"
    else:
        headers[API_KEY_HEADER] = key
