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

__all__ = ["ADAPTERS", "Adapter", "RouteRefusal", "map_path"]
