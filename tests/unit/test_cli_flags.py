"""Every ``--flag`` a message of this package names is an option of one of its commands.

The options are read from the real parsers (each command's ``main(["--help"])`` builds them),
the messages from every string literal of the package. Flags of other tools that messages name
on purpose (Megatron-LM's arguments, torchrun, mpirun, apptainer, sbatch) are listed below
with their tool.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_llmjp"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
COMMANDS = sorted(p.stem for p in (PACKAGE / "cli").glob("*.py") if p.stem != "__init__")
MEGATRON_LM = {
    "--add-bias-linear", "--add-qkv-bias", "--apply-layernorm-1p",
    "--apply-residual-connection-post-layernorm", "--ckpt-convert-format",
    "--ckpt-assume-constant-structure", "--ckpt-convert-save", "--ckpt-format",
    "--disable-bias-linear", "--dist-ckpt-optim-fully-reshardable", "--manual-gc",
    "--heterogeneous-layers-config-path", "--hybrid-override-pattern", "--load",
    "--lr-decay-iters", "--lr-warmup-init", "--lr-warmup-iters", "--lr-wsd-decay-iters",
    "--moe-aux-loss-coeff", "--moe-layer-freq", "--moe-router-dtype",
    "--moe-router-enable-expert-bias", "--moe-router-group-topk", "--moe-router-num-groups",
    "--moe-router-score-function", "--moe-router-topk-scaling-factor",
    "--moe-shared-expert-intermediate-size", "--mrope-section", "--mtp-num-layers",
    "--multi-latent-attention", "--no-save-optim", "--normalization",
    "--override-opt-param-scheduler", "--position-embedding-type", "--rotary-interleaved",
    "--rotary-percent", "--rotary-seq-len-interpolation-factor", "--squared-relu", "--swiglu",
    "--tokenizer-type", "--use-rope-scaling",
    "--flag",  # a placeholder in the text explaining Megatron-LM's store_true arguments
}  # fmt: skip
EXTERNAL = {
    **dict.fromkeys(MEGATRON_LM, "Megatron-LM"),
    **dict.fromkeys(("--nproc-per-node", "--master-addr", "--master-port"), "torchrun"),
    **dict.fromkeys(("--allow-run-as-root", "--bind-to", "--oversubscribe"), "mpirun"),
    "--nv": "apptainer",
    "--dependency": "sbatch",
}


def _command_options() -> dict[str, set[str]]:
    """Option strings of every parser each command builds, by command module."""
    found: dict[str, set[str]] = {}
    original = argparse._ActionsContainer.add_argument
    current: set[str] = set()

    def recording(self, *args, **kwargs):
        action = original(self, *args, **kwargs)
        current.update(action.option_strings)
        return action

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse._ActionsContainer, "add_argument", recording)
        for name in COMMANDS:
            current.clear()
            module = importlib.import_module(f"megatron_llmjp.cli.{name}")
            with contextlib.suppress(SystemExit):
                module.main(["--help"])
            found[name] = set(current)
    return found


def _named_flags() -> dict[str, list[str]]:
    """Flag -> where string literals of the package name it."""
    named: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in FLAG.findall(node.value):
                    where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                    named.setdefault(flag, []).append(where)
    return named


def test_every_flag_named_in_a_message_exists(capsys):
    options = set().union(*_command_options().values())
    capsys.readouterr()
    assert {"--set", "--skip-parity", "--tokenizer"} <= options  # the parsers were read
    unknown = {
        flag: where
        for flag, where in _named_flags().items()
        if flag not in options and flag not in EXTERNAL
    }
    assert not unknown, f"flags no command defines (and no known tool's): {unknown}"
    stale = sorted(f for f in EXTERNAL if f in options)
    assert not stale, f"listed as another tool's but defined here: {stale}"


def test_parity_tokenizer_message_names_convert_flags(monkeypatch, tmp_path, capsys):
    """The real failure text of a parity check without a tokenizer."""
    from megatron_llmjp.convert import parity
    from megatron_llmjp.convert.transforms import ConversionError

    monkeypatch.setattr(parity, "_shared_data", lambda: tmp_path)
    with pytest.raises(ConversionError) as e:
        parity._tokenizer_path({"data": {"tokenizer": str(tmp_path / "none")}})
    convert = _command_options()["convert"]
    capsys.readouterr()
    named = FLAG.findall(str(e.value))
    assert named and set(named) <= convert, (named, sorted(convert))
