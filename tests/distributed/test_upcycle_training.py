"""Drop-Upcycling end to end on CPU/gloo: a dense model trained with TP2 becomes an MoE model.

(a) Plain upcycling (R=0, every expert the whole dense FFN, top-1) computes the dense model's
function: logits agree to FP32 rounding. (b) A Drop-Upcycled model (4 experts of half the
dense FFN, top-2, R=0.5) trains with EP2 from the upcycled weights, and its first-step loss is
close to the dense model's on the same batch and far below a randomly initialised MoE's.

Runs use FP32 and the synthetic token stream of ``data/text.py`` (a learnable pattern, vocab
1000: an untrained model's loss is about ln(1000) = 6.9); each run is a fresh set of forked
ranks (``tests/helpers/spawn.py``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_llmjp.config.loader import build_config
from megatron_llmjp.upcycle.driver import UpcycleSpec, upcycle
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed

DENSE = [
    "model.name=llm-jp-4-tiny-dense",
    "data.synthetic=true",
    "model.vocab_size=1000",
    "train.seq_length=64",
    "train.micro_batch_size=1",
    "train.global_batch_size=8",
    "optim.lr=3e-3",
    "schedule.style=constant",
    "logging.tensorboard=false",
    "logging.gpu_telemetry=false",
]
ONE_STEP = ["train.iters=1", "checkpoint.dir=null", "checkpoint.load_optimizer=false"]


def _train(config: str | None, overrides: list[str]) -> list[float]:
    from megatron_llmjp.training.trainer import run

    return [r["loss"] for r in run(build_config(config, overrides)).history]


def train(world: int, config: Path | None, overrides: list[str]) -> list[float]:
    """The losses of a run on ``world`` ranks (as logged by the last rank)."""
    return spawn(_train, world, str(config) if config else None, overrides)[-1]


def _logits(ckpt: Path, tokens: torch.Tensor):
    from megatron_llmjp.convert.parity import megatron_logits

    # As numpy: a tensor would travel through shared memory that dies with the child.
    return megatron_logits(ckpt, tokens).numpy()


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A dense checkpoint root trained 20 steps with TP2 (the upcycler reads global tensors,
    whatever layout wrote them)."""
    tmp = tmp_path_factory.mktemp("dense")
    overrides = [*DENSE, "parallel.tp=2", "train.iters=20", f"output_dir={tmp / 'run'}"]
    losses = train(2, None, [*overrides, f"checkpoint.dir={tmp / 'ckpt'}"])
    assert losses[-1] < losses[0] - 1.0, losses  # it learned something
    return tmp / "ckpt"


PLAIN = [
    # Top-1 needs the softmax before the top-k in megatron-core, so the single routed
    # probability is 1 only with one expert: the router is forced by construction.
    ("1-expert-top1", UpcycleSpec(num_experts=1, topk=1, expert_ffn=192, drop_ratio=0.0)),
    # All of 4 identical experts with renormalised weights: any router gives the dense FFN.
    ("4-experts-top4", UpcycleSpec(num_experts=4, topk=4, expert_ffn=192, drop_ratio=0.0)),
]


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dense_logits(dense, tokens) -> torch.Tensor:
    return torch.from_numpy(spawn(_logits, 1, dense / "iter_0000020", tokens)[0])


@pytest.mark.parametrize("name,spec", PLAIN, ids=[p[0] for p in PLAIN])
def test_plain_upcycling_computes_the_dense_function(
    dense, tokens, dense_logits, tmp_path, name, spec
):
    # R=0 and F = the dense FFN: every expert is the dense FFN, and the routing weights of a
    # token sum to 1.
    upcycle(dense, tmp_path / "moe", spec, overrides=["parallel.tp=1"], progress=False)
    got = torch.from_numpy(spawn(_logits, 1, tmp_path / "moe" / "iter_0000000", tokens)[0])
    assert dense_logits.shape == got.shape == (2, 64, 1000)
    diff = (dense_logits - got).abs().max().item()
    print(
        f"{name}: max |logit difference| {diff:.2e} (max |logit| "
        f"{dense_logits.abs().max().item():.2f})"
    )
    assert diff < 1e-5


def test_drop_upcycled_model_trains_with_ep2_from_near_the_dense_loss(dense, tmp_path):
    spec = UpcycleSpec(num_experts=4, topk=2, expert_ffn=96, drop_ratio=0.5, seed=1)
    moe = tmp_path / "moe"
    overrides = ["parallel.tp=1", "parallel.ep=2", "train.iters=4"]
    upcycle(dense, moe, spec, overrides=overrides, progress=False)
    config = moe / "iter_0000000" / "config.yaml"
    out = f"output_dir={tmp_path / 'run'}"
    # The same first batch everywhere (same data seed, batch size and stream).
    dense_loss = train(
        1,
        dense / "iter_0000020" / "config.yaml",
        [*ONE_STEP, "parallel.tp=1", out, f"checkpoint.load={dense}"],
    )[0]
    upcycled = train(
        2,
        config,
        [out, f"checkpoint.load={moe}", "checkpoint.load_optimizer=false", "optim.lr=1e-3"],
    )
    random_moe = train(2, config, [out, "checkpoint.load=null", "train.iters=1"])[0]
    print(
        f"first-step loss: dense {dense_loss:.3f}, drop-upcycled MoE {upcycled[0]:.3f} "
        f"(then {', '.join(f'{x:.3f}' for x in upcycled[1:])}), random MoE {random_moe:.3f}"
    )
    assert all(math.isfinite(x) for x in upcycled)
    assert random_moe > 6.5  # about ln(1000)
    # Close to the dense model: the gap is a small fraction of the gap to a random start.
    assert upcycled[0] - dense_loss < 0.25 * (random_moe - dense_loss)
    assert upcycled[-1] < upcycled[0]
