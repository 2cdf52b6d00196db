"""OpenAI: the base adapter's defaults (OpenAI format, Bearer key)."""

from aibridgeproxyd.adapters.base import Adapter


class OpenAIAdapter(Adapter):
    """OpenAI's own API; everything but its hosts and base URL is the base adapter's."""

    type_name = "openai"
    default_hosts = ("api.openai.com",)
    default_base_url = "https://api.openai.com/v1"
    default_display_name = "OpenAI"
