"""Named LLM-jp-4 models (defined in ``megatron_llmjp.config.presets``, re-exported here)."""

from megatron_llmjp.config.presets import MODELS, UnknownModelError, get_model

__all__ = ["MODELS", "UnknownModelError", "get_model"]
