"""Megatron <-> Hugging Face checkpoint conversion: declarative tables, one streaming driver."""
