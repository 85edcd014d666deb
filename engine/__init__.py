"""gemforge.engine: model loading, the Gemma forward, generation and serving."""
from .config import ModelConfig, preset
from .errors import CheckpointError, ConfigError, GemforgeError, RequestError, TokenizerError
from .sampling import SamplingParams


def __getattr__(name):  # LLM pulls in torch-heavy modules; import it on first use
    if name == "LLM":
        from .llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["CheckpointError", "ConfigError", "GemforgeError", "LLM", "ModelConfig", "RequestError",
           "SamplingParams", "TokenizerError", "preset"]
