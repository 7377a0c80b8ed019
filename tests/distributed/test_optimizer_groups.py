"""Weight decay and learning rate per parameter group, on the trainer's megatron-core optimizer.

megatron-core's ``get_megatron_optimizer`` puts every 1-D parameter (RMSNorm gains, q/k-norm
gains) in a group with ``wd_mult=0``; Megatron-LM never decays them. With a zero gradient and a
fresh AdamW state the Adam term of the update is exactly zero (``m = v = 0``), so one step at lr
``a`` and weight decay ``w`` must leave every 1-D parameter bitwise unchanged and scale every
matrix by exactly ``1 - a * w`` (torch's decoupled AdamW: ``p <- p * (1 - lr * wd)``).
"""

from __future__ import annotations

import pytest
import torch

from megatron_llmjp.config.loader import build_config
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed

LR, WD = 1e-2, 0.1


def _zero_grad_step(overrides: list[str]) -> dict:
    """Build the trainer's state, apply the schedule, take one step with all-zero gradients;
    return per-parameter before/after tensors and the param groups' values (this rank)."""
    from megatron_llmjp.parallel import dist
    from megatron_llmjp.training.trainer import _build, check_runtime

    cfg = build_config(
        overrides=[
            "data.synthetic=true",
            "model.vocab_size=1000",
            f"optim.lr={LR}",
            f"optim.min_lr={LR}",
            f"optim.weight_decay={WD}",
            "schedule.style=constant",
            "schedule.warmup_iters=0",
            "train.iters=10",
            *overrides,
        ]
    )
    info = dist.discover_ranks()
    layout = check_runtime(cfg, info).layout
    dist.init_distributed(info, layout, 5)
    try:
        dist.seed_everything(cfg.train.seed)
        state = _build(cfg, layout)
        applied = state.schedule.apply(3 * cfg.train.global_batch_size)
        named = {name: p for chunk in state.model for name, p in chunk.named_parameters()}
        names_by_id = {id(p): name for name, p in named.items()}
        groups = [
            {
                "lr": g["lr"],
                "weight_decay": g["weight_decay"],
                "wd_mult": g["wd_mult"],
                "names": sorted(names_by_id.get(id(p), "?") for p in g["params"]),
            }
            for g in state.optimizer.param_groups
        ]
        before = {name: p.detach().clone().numpy() for name, p in named.items()}
        for chunk in state.model:
            chunk.zero_grad_buffer()
        state.optimizer.zero_grad()
        ok, grad_norm, _ = state.optimizer.step()
        after = {name: p.detach().clone().numpy() for name, p in named.items()}
        return {
            "applied": applied,
            "groups": groups,
            "before": before,
            "after": after,
            "ok": ok,
            "grad_norm": float(grad_norm),
        }
    finally:
        dist.destroy_distributed()


def _check_update(out: dict) -> tuple[int, int]:
    """Norms unchanged, matrices scaled by exactly (1 - LR*WD); returns (n 1-D, n matrices)."""
    assert out["ok"] and out["grad_norm"] == 0.0
    n_vec = n_mat = 0
    for name, before in out["before"].items():
        before, after = torch.from_numpy(before), torch.from_numpy(out["after"][name])
        if before.dim() == 1:
            n_vec += 1
            assert torch.equal(after, before), f"{name}: a 1-D parameter moved with zero gradient"
        else:
            n_mat += 1
            expected = before * (1 - LR * WD)
            torch.testing.assert_close(after, expected, rtol=1e-7, atol=0, msg=name)
            assert not torch.equal(after, before), name
    return n_vec, n_mat


def test_norm_gains_are_not_decayed_single_process(tmp_path):
    (out,) = spawn(
        _zero_grad_step,
        1,
        [
            "model.name=llm-jp-4-tiny-moe",  # has q/k norms, expert and dense groups
            "optim.use_distributed_optimizer=false",
            f"output_dir={tmp_path}",
        ],
    )
    assert out["applied"] == LR
    decayed, not_decayed = set(), set()
    for g in out["groups"]:
        assert g["lr"] == LR
        assert g["weight_decay"] == WD * g["wd_mult"]
        assert "?" not in g["names"]
        (not_decayed if g["wd_mult"] == 0.0 else decayed).update(g["names"])
    dims = {name: t.ndim for name, t in out["before"].items()}
    assert not_decayed == {n for n, d in dims.items() if d == 1}
    assert decayed == {n for n, d in dims.items() if d >= 2}
    assert any("layernorm" in n for n in not_decayed)
    assert any("q_layernorm" in n for n in not_decayed)
    n_vec, n_mat = _check_update(out)
    assert n_vec >= 4 and n_mat >= 4


def test_norm_gains_are_not_decayed_distributed_optimizer(tmp_path):
    """The same through the distributed optimizer's sharded master weights (EP2, DP2)."""
    outs = spawn(
        _zero_grad_step,
        2,
        [
            "model.name=llm-jp-4-tiny-moe",
            "parallel.ep=2",
            "optim.use_distributed_optimizer=true",
            f"output_dir={tmp_path}",
        ],
    )
    for out in outs:
        for g in out["groups"]:
            assert g["lr"] == LR
            assert g["weight_decay"] == WD * g["wd_mult"]
        _check_update(out)
