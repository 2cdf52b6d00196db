"""Azure OpenAI: OpenAI format, the ``api-key`` header, deployments and ``api-version``.

Two URL styles exist for one resource (``https://<res>.openai.azure.com``):

- the v1 style, ``/openai/v1/<operation>``, where the body's ``model`` names a deployment;
- the deployment style, ``/openai/deployments/<deployment>/<operation>?api-version=...``.

base_url may be the resource root, ``…/openai`` or ``…/openai/v1``: all name the same resource
(a custom prefix such as an API Management path is kept in front of ``/openai``). Without the
``deployments`` setting every request uses the v1 style. With it, a request whose model is in
the map goes to that deployment; a model that is not in the map falls through to the v1 style
unchanged, which works whenever the deployment is named after the model (Azure's default).
Requests already in Azure's deployment shape (``/openai/deployments/...``, from an Azure SDK)
are kept as sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, quote, urlencode

from aibridgeproxyd.adapters.base import (
    Adapter,
    ResponseTransform,
    decoded_request_body,
    has_segment_prefix,
    parsed_body_model,
    query_model,
    setting_text,
    strip_segment_prefix,
)
from aibridgeproxyd.credentials import credential_values
from aibridgeproxyd.model import Provider, ProviderRecord, Upstream

if TYPE_CHECKING:
    from mitmproxy import http

# Deployment-style URLs require an api-version; this GA version is used when none is set.
DEFAULT_DEPLOYMENT_API_VERSION = "2024-10-21"


def resource_root(base_path: str) -> str:
    """The base path without a trailing ``/openai`` or ``/openai/v1``."""
    for suffix in ("/openai/v1", "/openai"):
        if base_path == suffix or base_path.endswith(suffix):
            return base_path[: -len(suffix)]
    return base_path


def deployments(settings: Mapping[str, Any]) -> Mapping[str, str]:
    value = settings.get("deployments")
    if not isinstance(value, Mapping):
        return {}
    return {model: name for model, name in value.items() if isinstance(name, str) and name}


class AzureAdapter(Adapter):
    """Azure OpenAI: the key goes in ``api-key``; OpenAI paths are mapped onto deployments and
    ``api-version`` (settings ``deployments`` and ``api_version``)."""

    type_name = "azure"
    genai_provider_name = "azure.ai.openai"
    known_settings = frozenset({"api_version", "deployments"})
    # Operations Azure serves under /openai/deployments/<name>/. The others (responses, files,
    # batches, ...) exist only in the v1 style, where the deployment goes into the body's model.
    deployment_operations: ClassVar[tuple[str, ...]] = (
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/images/generations",
        "/audio/speech",
    )

    def problem(self, record: ProviderRecord, upstream: Upstream) -> str | None:
        value = record.settings.get("deployments")
        if value is not None and not (
            isinstance(value, Mapping)
            and all(isinstance(name, str) and name for name in value.values())
        ):
            return (
                "azure setting deployments must map model names to deployment names, "
                'such as {"gpt-4o": "my-gpt-4o"}'
            )
        api_version = record.settings.get("api_version")
        if api_version is not None and not isinstance(api_version, str):
            return (
                f"azure setting api_version must be a string like 2024-10-21, not {api_version!r}"
            )
        return super().problem(record, upstream)

    def request_model(self, request: http.Request) -> str | None:
        # Parsed whole, since it decides the deployment; only a body declared JSON has one.
        # A Realtime WebSocket upgrade (v1 style) names it in the query instead.
        if "json" not in request.headers.get("content-type", ""):
            return query_model(request)
        return parsed_body_model(request)

    def inject_key(self, headers: http.Headers, key: str) -> None:
        headers.pop("authorization", None)
        headers["api-key"] = key

    def rewrite(
        self, request: http.Request, provider: Provider, key: str | None
    ) -> ResponseTransform | None:
        if key is None:
            _bearer_key_to_api_key(request.headers)
        return super().rewrite(request, provider, key)

    def upstream_path(self, request: http.Request, provider: Provider, upstream: Upstream) -> str:
        root = resource_root(upstream.path)
        path, _, query = request.path.partition("?")
        api_version = setting_text(provider.settings, "api_version")
        operation = _operation(path, root, self.version_prefix)
        if operation is not None:
            model = self.request_model(request)
            deployment = deployments(provider.settings).get(model) if model else None
            if deployment and operation in self.deployment_operations:
                path = f"{root}/openai/deployments/{quote(deployment, safe='')}{operation}"
                api_version = api_version or DEFAULT_DEPLOYMENT_API_VERSION
            else:
                path = f"{root}/openai/v1{operation}"
                if deployment:
                    _replace_json_model(request, deployment)
        # A client that names its own api-version (an Azure SDK) knows its resource: kept.
        if api_version and "api-version" not in dict(parse_qsl(query, keep_blank_values=True)):
            query = "&".join(
                part for part in (query, urlencode({"api-version": api_version})) if part
            )
        return path + ("?" + query if query else "")


def _operation(path: str, root: str, version_prefix: str) -> str | None:
    """``/chat/completions`` for an OpenAI SDK path (``/v1/...``) or a v1-style Azure path;
    None for any other Azure path (``/openai/deployments/...``), which is kept as sent."""
    v1_base = root + "/openai/v1"
    if has_segment_prefix(path, v1_base):
        return strip_segment_prefix(path, v1_base)
    if has_segment_prefix(path, root + "/openai"):
        return None
    return strip_segment_prefix(path, version_prefix)


def _replace_json_model(request: http.Request, model: str) -> None:
    # Only called once request_model parsed this body, so it decodes within the bound.
    body = json.loads(decoded_request_body(request))
    body["model"] = model
    request.content = json.dumps(body, ensure_ascii=False).encode()


def _bearer_key_to_api_key(headers: http.Headers) -> None:
    """A BYOK Azure key sent the OpenAI SDK's way (``Authorization: Bearer``) moves to
    ``api-key``, which every Azure URL style accepts. A JWT stays: it is an Entra ID token,
    which Azure does take as a Bearer."""
    if "api-key" in headers:
        return
    for name, credential in credential_values(headers):
        is_jwt = credential.startswith("eyJ") and credential.count(".") == 2
        if name == "authorization" and credential and not is_jwt:
            del headers["authorization"]
            headers["api-key"] = credential
            return
