"""``logging.wandb_*``: checked before anything starts."""

from __future__ import annotations

import importlib.util

import pytest

from megatron_llmjp.config.loader import ConfigError, build_config

SYNTHETIC = ["data.synthetic=true"]


def test_wandb_needs_the_package_unless_disabled(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"megatron-llmjp\[wandb\]"):
        build_config(overrides=[*SYNTHETIC, "logging.wandb_project=p"])
    cfg = build_config(
        overrides=[*SYNTHETIC, "logging.wandb_project=p", "logging.wandb_mode=disabled"]
    )
    assert cfg.logging.wandb_mode == "disabled"


def test_wandb_fields_are_checked():
    with pytest.raises(ConfigError, match="wandb_project is not"):
        build_config(overrides=[*SYNTHETIC, "logging.wandb_entity=llm-jp"])
    with pytest.raises(ConfigError, match="logging.wandb_mode"):
        build_config(overrides=[*SYNTHETIC, "logging.wandb_project=p", "logging.wandb_mode=on"])
    cfg = build_config(overrides=SYNTHETIC)
    assert cfg.logging.wandb_project is None and cfg.logging.wandb_mode == "online"
