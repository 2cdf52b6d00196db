"""OpenRouter: OpenAI format, Bearer key."""

from aibridgeproxyd.adapters.base import Adapter


class OpenRouterAdapter(Adapter):
    """OpenAI format with a Bearer key. Model ids such as ``anthropic/claude-sonnet-4`` pass
    through untouched."""

    type_name = "openrouter"
    genai_provider_name = "openrouter"
    default_hosts = ("openrouter.ai",)
    default_base_url = "https://openrouter.ai/api/v1"
