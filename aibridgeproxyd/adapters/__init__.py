"""The adapter registry: provider type -> adapter."""

from aibridgeproxyd.adapters.anthropic import AnthropicAdapter
from aibridgeproxyd.adapters.base import Adapter, map_path
from aibridgeproxyd.adapters.openai import OpenAIAdapter

ADAPTERS: dict[str, Adapter] = {
    adapter.type_name: adapter for adapter in (OpenAIAdapter(), AnthropicAdapter())
}

__all__ = ["ADAPTERS", "Adapter", "map_path"]
