"""``build_config``: precedence, coercion, registry overrides, errors that name the field."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_llmjp.config.loader import ConfigError, build_config, dump_yaml
from megatron_llmjp.config.schema import RunConfig, TrainConfig
from megatron_llmjp.models.registry import MODELS

SYNTHETIC = ["data.synthetic=true"]


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_only():
    cfg = build_config(overrides=SYNTHETIC)
    assert isinstance(cfg, RunConfig)
    assert cfg.train == TrainConfig()
    assert cfg.model == MODELS[cfg.model.name]
    assert cfg.data.synthetic is True


def test_precedence_defaults_yaml_set(tmp_path):
    p = write(
        tmp_path,
        "train:\n  iters: 7\n  seq_length: 64\ndata:\n  synthetic: true\noptim:\n  lr: 0.001\n",
    )
    cfg = build_config(p, ["train.iters=9"])
    assert cfg.train.iters == 9  # --set beats YAML
    assert cfg.train.seq_length == 64  # YAML beats the default
    assert cfg.train.micro_batch_size == TrainConfig().micro_batch_size  # default kept
    assert cfg.optim.lr == 0.001
    assert cfg.data.synthetic is True


def test_output_dir_argument_beats_everything(tmp_path):
    p = write(tmp_path, "output_dir: runs/from-yaml\ndata: {synthetic: true}\n")
    cfg = build_config(p, ["output_dir=runs/from-set"], output_dir=str(tmp_path / "out"))
    assert cfg.output_dir == str(tmp_path / "out")


def test_scientific_notation_is_a_float(tmp_path):
    cfg = build_config(overrides=[*SYNTHETIC, "optim.lr=3e-4"])
    assert isinstance(cfg.optim.lr, float)
    assert cfg.optim.lr == 0.0003
    # YAML 1.1 reads 3e-4 (no dot) as a string; the loader converts it.
    p = write(tmp_path, "optim:\n  lr: 3e-4\n  min_lr: 1e-5\ndata: {synthetic: true}\n")
    cfg = build_config(p)
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 0.0003
    assert isinstance(cfg.optim.min_lr, float) and cfg.optim.min_lr == 1e-5


def test_int_is_accepted_for_float():
    cfg = build_config(overrides=[*SYNTHETIC, "optim.clip_grad=2"])
    assert isinstance(cfg.optim.clip_grad, float) and cfg.optim.clip_grad == 2.0


def test_model_overrides_on_top_of_registry():
    cfg = build_config(overrides=[*SYNTHETIC, "model.name=llm-jp-4-tiny-moe", "model.num_layers=2"])
    assert cfg.model == replace(MODELS["llm-jp-4-tiny-moe"], num_layers=2)
    assert cfg.model.is_moe and cfg.model.qk_layernorm


def test_yaml_model_name_with_set_override(tmp_path):
    p = write(tmp_path, "model:\n  name: llm-jp-4-tiny-dense\ndata: {synthetic: true}\n")
    cfg = build_config(p, ["model.hidden_size=128"])
    assert cfg.model == replace(MODELS["llm-jp-4-tiny-dense"], hidden_size=128)


def test_unknown_set_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        build_config(overrides=[*SYNTHETIC, "train.iterz=5"])
    msg = str(e.value)
    assert "train.iterz" in msg
    for valid in ("iters", "seq_length", "global_batch_size", "micro_batch_size", "seed"):
        assert valid in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="trian"):
        build_config(overrides=[*SYNTHETIC, "trian.iters=5"])


def test_set_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        build_config(overrides=["train.iters"])


def test_unknown_model_lists_known(tmp_path):
    p = write(tmp_path, "model:\n  name: llm-jp-5\ndata: {synthetic: true}\n")
    with pytest.raises(ConfigError) as e:
        build_config(p)
    msg = str(e.value)
    assert "llm-jp-5" in msg
    for name in MODELS:
        assert name in msg


def test_yaml_type_error_names_file_line_and_key(tmp_path):
    p = write(tmp_path, "train:\n  iters: abc\ndata:\n  synthetic: true\n")
    with pytest.raises(ConfigError) as e:
        build_config(p)
    msg = str(e.value)
    assert f"{p}:2" in msg
    assert "train.iters" in msg
    assert "abc" in msg


def test_set_type_error_names_key():
    with pytest.raises(ConfigError, match=r"train\.iters.*int"):
        build_config(overrides=[*SYNTHETIC, "train.iters=abc"])


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match=r"train\.iters"):
        build_config(overrides=[*SYNTHETIC, "train.iters=true"])


def test_literal_choices_are_checked():
    with pytest.raises(ConfigError, match=r"precision\.dtype.*'bf16'"):
        build_config(overrides=[*SYNTHETIC, "precision.dtype=fp16"])


def test_invalid_yaml_syntax_reports_file_and_line(tmp_path):
    p = write(tmp_path, "train:\n  iters: 5\n  seq_length: [1, 2\ndata: {synthetic: true}\n")
    with pytest.raises(ConfigError) as e:
        build_config(p)
    msg = str(e.value)
    assert re.search(re.escape(str(p)) + r":\d+: invalid YAML", msg), msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config(tmp_path / "nope.yaml")


def test_dump_yaml_round_trip(tmp_path):
    cfg = build_config(
        overrides=[
            *SYNTHETIC,
            "model.name=llm-jp-4-tiny-moe",
            "model.num_layers=2",
            "optim.lr=3e-4",
            "schedule.style=wsd",
            "schedule.warmup_iters=2",
            "schedule.wsd_decay_iters=3",
            "train.iters=20",
        ],
        output_dir=str(tmp_path / "run"),
    )
    out = tmp_path / "run" / "config.yaml"
    dump_yaml(cfg, out)
    assert out.is_file()
    assert not out.with_name("config.yaml.tmp").exists()
    again = build_config(out)
    assert again == cfg
