"""Data mixtures: which indexed datasets a stage samples from, and how much of each.

A mixture file (YAML) names its sources once and defines stages, each with its own mix and an
optional token budget::

    sources:                      # name -> megatron indexed dataset prefix (.bin/.idx)
      ja: runs/data/quickstart/ja
      en: runs/data/quickstart/en
      code: runs/data/quickstart/code
    max_epochs: 4                 # warn when a source would be repeated more often
    stages:
      pretrain:
        tokens: 3_000_000         # budget (optional; else the run's iters x batch x seq)
        mix:
          ja: {multiplier: 4.5}   # sampled 4.5x as often per token as a multiplier-1 source
          en: {multiplier: 1}
          code: {weight: 0.1}     # a fixed 10% share of the stage
      midtrain:
        mix: {ja: {weight: 0.5}, en: {weight: 0.5}}

Shares: ``weight`` sources get exactly their weight; the remaining ``1 - sum(weights)`` is split
over the ``multiplier`` sources in proportion to ``multiplier x natural tokens``. So a
multiplier is a relative repetition rate (LLM-jp-4 pre-training: Japanese 4.5x, code 7.6x), and
with only multipliers of 1 every source keeps its natural share. Relative paths are resolved
against the current directory, like every path in a run config.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_llmjp.config.errors import ConfigError
from megatron_llmjp.config.mixture_file import Mixture, Stage, load_mixture

_IDX_HEADER = struct.Struct("<9sQBQQ")
"""megatron-core's ``.idx`` header: magic, version, dtype code, sequence and document counts."""
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
"""Item size of each ``DType`` code of ``megatron.core.datasets.indexed_dataset``."""


def check_indexed(prefix: str, where: str = "dataset") -> int:
    """Check that ``prefix``.bin/.idx form a readable megatron indexed dataset and return its
    tokens (EOD included), reading the ``.idx`` header and tables only.

    The ``.bin`` must hold exactly the bytes the ``.idx`` describes: a truncated or padded copy
    fails here, before any process group exists, rather than at the step that first reads it.
    ``where`` prefixes every error (e.g. the mixture file and source)."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for p in (bin_, idx):
        if not p.is_file():
            raise ConfigError(
                f"{where}: {p} not found (cwd: {Path.cwd()}); build it with llmjp-preprocess"
            )
    idx_size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_IDX_HEADER.size)
        if len(head) < _IDX_HEADER.size:
            raise ConfigError(f"{where}: {idx} is {idx_size} bytes, too short for an index")
        magic, _version, code, n, n_docs = _IDX_HEADER.unpack(head)
        if magic != _IDX_MAGIC or code not in _DTYPE_SIZES:
            raise ConfigError(f"{where}: {idx} is not a megatron indexed-dataset index")
        want_idx = _IDX_HEADER.size + n * (4 + 8) + n_docs * 8
        if idx_size != want_idx:
            raise ConfigError(
                f"{where}: {idx} is {idx_size:,} bytes but its header describes {n:,} "
                f"sequences and {n_docs:,} documents ({want_idx:,} bytes): truncated or corrupt"
            )
        lengths = np.fromfile(f, dtype=np.int32, count=n)
        pointers = np.fromfile(f, dtype=np.int64, count=n)
    itemsize = _DTYPE_SIZES[code]
    want = int(pointers[-1]) + int(lengths[-1]) * itemsize if n else 0
    actual = bin_.stat().st_size
    if actual != want:
        raise ConfigError(
            f"{where}: {bin_} is {actual:,} bytes but {idx.name} describes {want:,} bytes "
            f"({n:,} sequences of {itemsize}-byte tokens): truncated, padded or from another "
            "run; rebuild it with llmjp-preprocess"
        )
    return int(lengths.sum(dtype=np.int64))


def natural_tokens(prefix: str) -> int:
    """Tokens in an indexed dataset (EOD included), read from its ``.idx`` only, after
    :func:`check_indexed`."""
    return check_indexed(prefix)


def check_datasets(path: str | Path, stage_name: str | None) -> None:
    """Every dataset the stage samples from exists (both files) and its ``.bin`` has the size
    its ``.idx`` describes, else name the file, expected and actual size."""
    mixture = load_mixture(path)
    for m in mixture.stage(stage_name).mix:
        check_indexed(mixture.sources[m.name], f"{path}: source {m.name}")


def shares(stage: Stage, natural: dict[str, int]) -> dict[str, float]:
    """Each source's share of the stage's sampled tokens (sums to 1)."""
    fixed = {m.name: m.weight for m in stage.mix if m.weight is not None}
    rest = 1.0 - sum(fixed.values())
    rel = {m.name: m.multiplier * natural[m.name] for m in stage.mix if m.multiplier is not None}
    total = sum(rel.values())
    if rel and total == 0 and rest > 0:
        raise ConfigError(f"stage {stage.name}: the multiplier sources hold no tokens")
    out = dict(fixed)
    out.update({n: rest * r / total for n, r in rel.items()} if rel else {})
    return out


@dataclass
class PlanRow:
    stage: str
    source: str
    prefix: str
    natural_tokens: int
    share: float
    sampled_tokens: int
    epochs: float


@dataclass
class StagePlan:
    stage: str
    budget: int
    budget_from: str
    rows: list[PlanRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def plan_stage(
    mixture: Mixture,
    stage: Stage,
    budget: int | None = None,
    natural: dict | None = None,
    budget_from: str | None = None,
) -> StagePlan:
    """Natural and sampled tokens, share and epochs per source for one stage."""
    natural = natural or {
        m.name: check_indexed(mixture.sources[m.name], f"{mixture.path}: source {m.name}")
        for m in stage.mix
    }
    if budget is None and stage.tokens is None:
        budget, source = sum(natural[m.name] for m in stage.mix), "natural total (no budget)"
    elif budget is None:
        budget, source = stage.tokens, f"stages.{stage.name}.tokens"
    else:
        source = budget_from or "the caller"
    plan = StagePlan(stage.name, int(budget), source)
    for name, share in shares(stage, natural).items():
        sampled = int(round(share * budget))
        epochs = sampled / natural[name] if natural[name] else float("inf")
        plan.rows.append(
            PlanRow(stage.name, name, mixture.sources[name], natural[name], share, sampled, epochs)
        )
        if epochs > mixture.max_epochs:
            plan.warnings.append(
                f"stage {stage.name}: source {name} would be repeated {epochs:.1f} times "
                f"(> max_epochs={mixture.max_epochs:g})"
            )
    return plan
