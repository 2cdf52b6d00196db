"""The adapter registry: provider type -> adapter."""

from aibridgeproxyd.adapters.anthropic import AnthropicAdapter
from aibridgeproxyd.adapters.azure import AzureAdapter
from aibridgeproxyd.adapters.base import Adapter, RouteRefusal, map_path
from aibridgeproxyd.adapters.bedrock import BedrockAdapter
from aibridgeproxyd.adapters.copilot import CopilotAdapter
from aibridgeproxyd.adapters.google import GoogleAdapter
from aibridgeproxyd.adapters.openai import OpenAIAdapter
from aibridgeproxyd.adapters.openai_compat import OpenAICompatAdapter
from aibridgeproxyd.adapters.openrouter import OpenRouterAdapter
from aibridgeproxyd.adapters.vercel import VercelAdapter

ADAPTERS: dict[str, Adapter] = {
    adapter.type_name: adapter
    for adapter in (
        OpenAIAdapter(),
        AnthropicAdapter(),
        BedrockAdapter(),
        CopilotAdapter(),
        AzureAdapter(),
        GoogleAdapter(),
        OpenRouterAdapter(),
        VercelAdapter(),
        OpenAICompatAdapter(),
    )
}

# The client format of a request whose provider type is unknown: OpenAI's error shape, which
# most clients read. A tunnel is intercepted only for a provider of a known type, so this is a
# last resort that keeps such an answer in some JSON client format.
FALLBACK_ADAPTER = ADAPTERS["openai"]


def adapter_for(provider_type: str | None) -> Adapter | None:
    """The adapter of ``provider_type``, or None for no type or one this proxy does not know:
    how a caller that holds only a tunnel's type (``ConnectInfo.provider_type``) finds the
    client format to answer in."""
    return ADAPTERS.get(provider_type) if provider_type is not None else None


__all__ = ["ADAPTERS", "FALLBACK_ADAPTER", "Adapter", "RouteRefusal", "adapter_for", "map_path"]
