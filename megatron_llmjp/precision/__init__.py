"""Numeric precision: FP8 recipes mapped onto megatron-core / Transformer Engine
(``recipes``), an emulated FP8 path for the local layers (``emulated``) and peak throughput
per GPU and precision (``peaks``)."""
