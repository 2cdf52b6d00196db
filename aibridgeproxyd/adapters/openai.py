from aibridgeproxyd.adapters.base import Adapter


class OpenAIAdapter(Adapter):
    type_name = "openai"
    default_hosts = ("api.openai.com",)
    default_base_url = "https://api.openai.com/v1"
    default_display_name = "OpenAI"
