"""Any server that speaks the OpenAI API, at the provider's required ``base_url``."""

from aibridgeproxyd.adapters.base import Adapter


class OpenAICompatAdapter(Adapter):
    """Any server that speaks the OpenAI API (vLLM, LiteLLM, Ollama, ...). base_url is required
    and its host is intercepted unless ``hosts`` says otherwise."""

    type_name = "openai-compat"
    # The backend is unknown; the convention's provider name names the API flavour spoken
    # (``server.address`` and the models tell the backend apart).
    genai_provider_name = "openai"
