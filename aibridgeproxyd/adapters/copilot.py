"""GitHub Copilot: the user's own GitHub token, to the Copilot host the client chose.

Copilot has one API host per plan (individual, business, enterprise) and the client picks the
one its account belongs to, so a request goes back to the host it was sent to, path unchanged.
An explicit base_url on the row overrides that (an internal relay, or a test fake). The proxy
never injects a key: ``interception.routing.route_request`` only strips the proxy token if a
client sent it as a credential.
Editor-Version, Copilot-Integration-Id and the other client headers are forwarded untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from aibridgeproxyd.adapters.base import Adapter
from aibridgeproxyd.credentials import CredentialMode
from aibridgeproxyd.model import Provider, Upstream

if TYPE_CHECKING:
    from mitmproxy import http

HTTPS_PORT = 443


class CopilotAdapter(Adapter):
    """GitHub Copilot, BYOK only: the request goes to the Copilot host the client chose."""

    type_name = "copilot"
    genai_provider_name = "github.copilot"
    default_hosts = (
        "api.individual.githubcopilot.com",
        "api.business.githubcopilot.com",
        "api.enterprise.githubcopilot.com",
    )
    # Shown and checked like any base_url, but requests go to the host they were sent to.
    default_base_url = "https://api.individual.githubcopilot.com"
    version_prefix = ""  # Copilot paths have no version: /chat/completions, /models
    credential_modes = frozenset({CredentialMode.BYOK})
    no_keys_because = "it always uses the user's own credential"

    def upstream_for(self, request: http.Request, provider: Provider) -> Upstream:
        if provider.record.base_url:
            return super().upstream_for(request, provider)
        # addons/route.py found this provider by request.host: one of the provider's hosts.
        return Upstream("https", request.host.lower(), HTTPS_PORT, "")

    def upstream_addresses(self, provider: Provider) -> Iterable[tuple[str, int]]:
        if provider.record.base_url:
            return super().upstream_addresses(provider)
        return [(host, HTTPS_PORT) for host in provider.hosts]
