"""A command validates only the config sections it uses (``validate_static(cfg, uses)``).

Conversion, upcycling and the parity check move weights (``WEIGHTS_ONLY``): the training data
named by the defaults or by the training run's config (paths relative to where training runs)
need not exist where they run. Planning uses all but the data; ``llmjp-params`` the model.
"""

from __future__ import annotations

import pytest

from megatron_llmjp.config.errors import ConfigError
from megatron_llmjp.config.loader import build_config
from megatron_llmjp.config.validate import SECTIONS, WEIGHTS_ONLY, validate_static

# One override per section that is invalid in that section only.
BAD = {
    "model": ("model.num_layers=0", "model.num_layers"),
    "train": ("train.micro_batch_size=0", "train.micro_batch_size"),
    "optim": ("optim.lr=0", "optim.lr"),
    "schedule": ("schedule.warmup_iters=-1", "schedule.warmup_iters"),
    "precision": ("precision.fp8_margin=-1", "precision.fp8_margin"),
    "recompute": ("recompute.num_layers=2", "recompute.num_layers"),
    "performance": ("performance.manual_gc_interval=-1", "performance.manual_gc_interval"),
    "logging": ("logging.interval=0", "logging.interval"),
    "checkpoint": ("checkpoint.interval=5", "checkpoint.dir"),
    "fault": ("fault.loss_spike_factor=0.5", "fault.loss_spike_factor"),
    "parallel": ("parallel.timeout_minutes=0", "parallel.timeout_minutes"),
    "data": ("data.tokenizer=/nonexistent/tokenizer", "data.tokenizer"),
}


def test_every_section_has_a_case():
    assert set(BAD) == set(SECTIONS)


@pytest.mark.parametrize("section", SECTIONS)
def test_a_section_is_checked_only_by_commands_that_use_it(section):
    bad, key = BAD[section]
    base = [] if section == "data" else ["data.synthetic=true"]
    others = [s for s in SECTIONS if s != section]
    build_config(overrides=[*base, bad], uses=others)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(overrides=[*base, bad], uses=[section])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(overrides=[*base, bad])  # training: every section


def test_unknown_section_is_a_programming_error():
    cfg = build_config(overrides=["data.synthetic=true"])
    with pytest.raises(ValueError, match="unknown config sections"):
        validate_static(cfg, uses=["dataset"])


def test_hf_to_mcore_needs_no_training_data(tmp_path, monkeypatch):
    """The fault: from any directory but the repository root, the default data.tokenizer
    (``../shared/...``) does not exist, and hf-to-mcore refused to convert."""
    transformers = pytest.importorskip("transformers")
    import torch

    from megatron_llmjp.cli.convert import main

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    argv = ["hf-to-mcore", "--input", "hf", "--output", "mc", "--skip-parity", "--no-progress"]
    assert main(argv) == 0
    assert (tmp_path / "mc" / "latest").exists() or any((tmp_path / "mc").iterdir())
    # The sections the conversion uses are still checked.
    assert main([*argv, "--force", "--set", "optim.lr=0"]) == 0  # not used: not checked
    assert main([*argv, "--force", "--set", "train.micro_batch_size=0"]) == 2


def test_parity_run_config_ignores_the_training_runs_data(tmp_path, monkeypatch):
    """The parity check rebuilds a checkpoint's config.yaml, whose data paths are relative to
    where the training ran."""
    import yaml

    from megatron_llmjp.config.loader import to_dict
    from megatron_llmjp.convert.parity import _run_config

    cfg = to_dict(build_config(overrides=["data.synthetic=true"]))
    cfg["data"].update(synthetic=False, tokenizer="tok", text_files=["corpus/a.txt"])
    cfg["optim"]["lr"] = 0  # a section the check does not use
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    assert _run_config(tmp_path, {}, ["train.seq_length=8"]).train.seq_length == 8


def test_planner_and_params_need_no_training_data(tmp_path, monkeypatch):
    from megatron_llmjp.cli.params import resolve_model
    from megatron_llmjp.cli.plan import PLAN_USES

    monkeypatch.chdir(tmp_path)
    assert "data" not in PLAN_USES and set(PLAN_USES) | {"data"} == set(SECTIONS)
    cfg = build_config(overrides=["model.name=llm-jp-4-8b"], uses=PLAN_USES)
    assert not cfg.data.synthetic  # the data section is left as configured, just unchecked
    assert resolve_model("llm-jp-4-8b", ["model.num_layers=2"]).num_layers == 2
    assert set(WEIGHTS_ONLY) < set(SECTIONS) and "data" not in WEIGHTS_ONLY
