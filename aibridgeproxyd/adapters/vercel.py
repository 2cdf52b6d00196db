"""Vercel AI Gateway: OpenAI format, Bearer key."""

from aibridgeproxyd.adapters.base import Adapter


class VercelAdapter(Adapter):
    """Vercel AI Gateway: OpenAI format with a Bearer key; ``provider/model`` ids untouched."""

    type_name = "vercel"
    genai_provider_name = "vercel"
    default_hosts = ("ai-gateway.vercel.sh",)
    default_base_url = "https://ai-gateway.vercel.sh/v1"
