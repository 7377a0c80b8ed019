"""megatron-llmjp: training the LLM-jp model family on megatron-core."""

__version__ = "0.1.0"
