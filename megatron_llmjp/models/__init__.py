"""Named models, parameter counting and building megatron-core GPT models."""
