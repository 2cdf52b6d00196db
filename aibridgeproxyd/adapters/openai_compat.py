"""Any server that speaks the OpenAI API, at the provider's required ``base_url``."""

from aibridgeproxyd.adapters.base import Adapter


class OpenAICompatAdapter(Adapter):
    """Any server that speaks the OpenAI API (vLLM, LiteLLM, Ollama, ...). base_url is required
    and its host is intercepted unless ``hosts`` says otherwise."""

    type_name = "openai-compat"
