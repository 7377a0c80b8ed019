"""Distributed checkpoints: atomic publishing, the manifest, and megatron-core state."""
