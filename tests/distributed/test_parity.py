"""Layout parity: every parallel layout reproduces the single-process run (gloo, CPU).

All layouts start from the same weights (layout-independent init) and read the same tokens per
optimizer step, so they must agree with the single-process run up to float reduction order.
Each run saves a checkpoint after its last step; megatron-core's ``torch_dist`` format stores
global (layer-stacked) tensors whatever layout wrote them, and the project's process-group-free
``TensorReader`` reads them back whole. Compared with the single-process run of this session:

* the per-step losses and gradient norms (Adam is nearly invariant to a wrong gradient scale,
  so the losses alone would not reveal a norm, and a clipping threshold, that is off);
* after the last step, every parameter, every FP32 master parameter (distributed optimizer) and
  both Adam moments (``exp_avg``, ``exp_avg_sq``). A gradient reduction that is missing for a
  few parameters (e.g. the norm gains under sequence parallelism) barely moves the losses
  but moves those parameters by orders of magnitude more than reduction order does.

A tensor's difference is ``max|got - ref| / max|ref|`` in FP64 (the largest element error
relative to the tensor's scale: element-wise ratios are meaningless for moments that are ~0);
each category reports its worst tensor, each curve its worst step.

Bounds (``FP32_BOUND``, ``FP8_BOUND``) against the largest differences measured (FP32: over all
layouts; FP8: emulated FP8 TP2 against TP1):

========== ============= ===== ==================== ===== ================================
category   FP32 measured bound FP8 measured         bound notes
========== ============= ===== ==================== ===== ================================
loss       2.6e-8        1e-6  4.4e-5               2e-4  one FP32 ULP of ~6.9 is 6.9e-8
grad_norm  4.8e-7        5e-6  9.6e-4               5e-3
param      3.2e-6        2e-5  2.6e-2               0.1   FP32: MoE ``ep=4``, embedding
master     3.2e-6        2e-5  2.7e-2               0.1   distributed optimizer only
exp_avg    6.0e-7        5e-6  4.8e-2               0.15
exp_avg_sq 1.2e-6        1e-5  4.4e-2               0.15
fp8_state  n/a           n/a   6.7e-2               0.2   amax histories and scales
fp8 ranks  n/a           n/a   0                    0     the TP ranks agree bitwise
========== ============= ===== ==================== ===== ================================

FP32: 1e-6 holds for the curves and ``exp_avg`` but not for every parameter or ``exp_avg_sq``:
Adam divides each element's step by ``sqrt(exp_avg_sq)``, so an element whose gradient is of the
order of the reduction-order error (the largest case: word-embedding entries whose
contributions nearly cancel) takes a step whose relative error is far above the gradient's.
The bounds sit 5-40x above the measured maxima (room for another BLAS or thread count) and
20-1e5x below what the faults below produce.
Emulated FP8 needs a BF16 model: the row-parallel partial sums are reduced in BF16, so TP2 and
TP1 legitimately differ by BF16 rounding, amplified by the quantisation that follows (an operand
near a rounding boundary lands on the other FP8 value). Its sharp checks are on the scaling
state: every TP rank must hold bitwise the same amax histories and scales (they are MAX-reduced
over the TP group), close to the single-process run's.

Faults injected one at a time into the test process (so every rank inherits them), and what
caught them, as max rel diff against its bound:

=======================================  ====================================================
fault                                    failing layouts (the signal)
=======================================  ====================================================
no TP all-reduce of norm gradients       every ``tp=2`` layout; dense ``tp=2``: exp_avg 0.59,
under sequence parallelism (megatron's   params 1.1e-3 (56x), grad_norm 1.2e-4 (24x), loss
``_allreduce_non_tensor_model_``         5.4e-7 (below its bound: the losses alone miss it);
``parallel_grads`` a no-op)              MoE ``tp=2``: params 1.9e-2; FP8: exp_avg 0.59
no model-parallel all-reduce of the      every layout but the non-distributed optimizer at
gradient norm in ``get_grad_norm_fp32``  dp=2 (which needs none): grad_norm 0.27-0.63,
                                         params 1.2e-3 (dense) to 8.2e-3 (MoE)
ranks 0 and 1 swapped in cpu_compat's    MoE ``ep=2, tp=2, etp=2``: loss 2.8e-3, params
padded uneven ``all_gather``             5.2e-2, exp_avg 1.0
no TP all-reduce of FP8 amaxes           FP8 ``tp=2``: TP ranks' scaling state 0.89 apart
(``precision/emulated.py`` ``_amax``)    (bound 0), against TP1 0.66 (bound 0.2); its losses
                                         and parameters stay within the BF16 noise
=======================================  ====================================================

The ``overlap_grad_reduce, overlap_param_gather`` layout also checks that a checkpoint holds
the parameters after the last step (their all-gather is deferred to the next forward pass).

Coverage of ``megatron_llmjp/parallel/cpu_compat.py``, the functions that move data. The
collectives' paths are counted in every run and each layout asserts the paths listed for it:

==============================================  =============================================
function / path                                 layouts that run it
==============================================  =============================================
``all_to_all_single`` (tensor split sizes made  MoE ``ep=2`` (alltoall), ``ep=2, tp=2``,
lists for gloo)                                 ``ep=2, tp=2, etp=2``, ``ep=2, pp=2``, ``ep=4``
``all_gather``, equal sizes (passed through)    MoE ``tp=2`` (experts split like dense
                                                layers), ``ep=2, tp=2, etp=2``
``all_gather``, uneven sizes (pad and trim)     MoE ``ep=2, tp=2, etp=2`` (the alltoall
                                                dispatcher's token gather over expert TP)
``_CpuDeviceMode`` (``device="cuda"`` to CPU)   every layout
``torch.cuda.get_rng_state`` (CPU generator)    every layout (megatron's RNG tracker)
==============================================  =============================================

``_CpuDeviceMode._backward`` (plain ``loss.backward()``), ``Tensor.cuda``/``.to("cuda")``,
``pin_memory`` and ``torch.cuda.set_rng_state`` are not reached by training (megatron's
schedules run the autograd engine themselves, place tensors with ``device=`` and fork the RNG
through the generator objects); streams and events move nothing.

MoE aux and z-losses are switched off here: megatron-core computes them over each rank's local
tokens, so they legitimately differ between layouts (the BF16/MoE training tests cover them).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatron_llmjp.checkpoint.store import iter_name
from megatron_llmjp.checkpoint.tensors import TensorReader
from megatron_llmjp.config.loader import build_config
from megatron_llmjp.parallel import cpu_compat
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed

STEPS = 5
BASE = [
    "data.synthetic=true",
    "model.vocab_size=1000",
    f"train.iters={STEPS}",
    "train.seq_length=64",
    "train.micro_batch_size=1",
    "train.global_batch_size=8",
    "schedule.warmup_iters=2",
    "logging.tensorboard=false",
    "model.moe_aux_loss_coeff=0",
    "model.moe_z_loss_coeff=0",
    # The comparison reads the global optimizer state; the default dp_reshardable form stores
    # per-DP-group buffer shards whose names depend on the layout.
    "checkpoint.optimizer_sharding=fully_reshardable",
]
FP8 = [
    "precision.dtype=bf16",
    "precision.fp8=delayed",
    "precision.fp8_format=hybrid",
    "precision.fp8_backend=emulated",
]
# Upper bounds on the max relative differences (see the module docstring for the measurements).
FP32_BOUND = {
    "loss": 1e-6,
    "grad_norm": 5e-6,
    "param": 2e-5,
    "master": 2e-5,
    "exp_avg": 5e-6,
    "exp_avg_sq": 1e-5,
}
FP8_BOUND = {
    "loss": 2e-4,
    "grad_norm": 5e-3,
    "param": 0.1,
    "master": 0.1,
    "exp_avg": 0.15,
    "exp_avg_sq": 0.15,
    "fp8_state": 0.2,
    "fp8_tp_ranks": 0.0,  # exact: the amaxes are MAX-reduced over the TP group
}

OPT = "optimizer.state."
CATEGORIES = ("param", "master", "exp_avg", "exp_avg_sq")


def _synchronous_save_results() -> None:
    """Let megatron-core's checkpoint writer pass its write results through an in-process queue.

    By default it creates a ``spawn`` multiprocessing manager for them (a fresh interpreter
    per rank and run, 2-4 s of every save here) because an asynchronous save hands them over
    from another process; the saves of these runs are synchronous (``checkpoint.async_save``
    is off), so the writer and the reader of the queue are this process. Set in every forked
    rank, even over one inherited from the parent, which the ranks would otherwise share."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()


def _count_collectives() -> Counter:
    """Count the calls of the compatibility layer's collectives on this rank, by path."""
    dist = torch.distributed
    assert cpu_compat.is_active()
    counts: Counter = Counter()
    all_gather, all_to_all_single = dist.all_gather, dist.all_to_all_single

    def counted_all_gather(tensor_list, tensor, group=None, async_op=False):
        rows = {t.shape[0] if t.dim() else 1 for t in tensor_list}
        counts["all_gather uneven" if tensor.dim() and len(rows) > 1 else "all_gather"] += 1
        return all_gather(tensor_list, tensor, group=group, async_op=async_op)

    def counted_all_to_all_single(*args, **kwargs):
        counts["all_to_all_single"] += 1
        return all_to_all_single(*args, **kwargs)

    dist.all_gather, dist.all_to_all_single = counted_all_gather, counted_all_to_all_single
    return counts


def _train(overrides: list[str], out_dir: str) -> dict:
    """Train ``BASE + overrides`` on this rank, saving a checkpoint after the last step.

    Returns the losses, the gradient norms, the calls of the compatibility layer's
    collectives and, with emulated FP8, the final delayed-scaling state of every quantised
    operand on this rank in construction order (the same on every rank). This process is a
    forked child: the instrumentation ends with it."""
    from megatron_llmjp.precision import emulated
    from megatron_llmjp.training.trainer import run

    scalings: list[emulated.Scaling] = []
    init = emulated.Scaling.__init__

    def tracked(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        scalings.append(self)

    emulated.Scaling.__init__ = tracked
    _synchronous_save_results()
    collectives = _count_collectives()
    cfg = build_config(
        overrides=BASE + overrides + [f"output_dir={out_dir}", f"checkpoint.dir={out_dir}/ckpt"]
    )
    history = run(cfg).history
    # Plain lists: tensors would travel through shared memory that dies with this process.
    fp8 = [None if s.amax_history is None else _plain(s.state()) for s in scalings]
    return {
        "loss": [r["loss"] for r in history],
        "grad_norm": [r["grad_norm"] for r in history],
        "collectives": dict(collectives),
        "fp8": fp8,
    }


def _plain(state: dict) -> dict:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _final_state(out_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The global tensors of the run's last checkpoint, per category: ``param`` (the model's),
    ``master`` (the distributed optimizer's FP32 copies), ``exp_avg`` and ``exp_avg_sq``."""
    reader = TensorReader(out_dir / "ckpt" / iter_name(STEPS))
    names = reader.names()
    tensors = dict(zip(names, reader.read_many([(k, ()) for k in names]), strict=True))
    state: dict[str, dict[str, torch.Tensor]] = {c: {} for c in CATEGORIES}
    for key, tensor in tensors.items():
        if not key.startswith(OPT):
            state["param"][key] = tensor
            continue
        category, _, name = key[len(OPT) :].partition(".")
        category = "master" if category == "param" else category
        assert category in state, f"unexpected optimizer tensor {key}"
        state[category][name] = tensor
    return state


def _run(world: int, overrides: list[str], out_dir: Path) -> dict:
    """Losses and gradient norms (the last pipeline stage's), the collectives' calls summed over
    the ranks, every rank's FP8 scaling state, and the final global state."""
    ranks = spawn(_train, world, overrides, str(out_dir))
    return {
        "loss": ranks[-1]["loss"],
        "grad_norm": ranks[-1]["grad_norm"],
        "collectives": sum((Counter(r["collectives"]) for r in ranks), Counter()),
        "fp8_ranks": [r["fp8"] for r in ranks],
        "state": _final_state(out_dir),
    }


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|got - ref| / max|ref|``, in FP64."""
    scale = ref.double().abs().max().item()
    err = (got.double() - ref.double()).abs().max().item()
    return err / scale if scale else err


def _compare(got: dict, ref: dict) -> dict[str, float]:
    """Per category, the worst relative difference (see the module docstring)."""
    diffs: dict[str, float] = {}
    for key in ("loss", "grad_norm"):
        assert len(got[key]) == STEPS
        assert all(math.isfinite(x) for x in got[key])
        diffs[key] = max(abs(a - b) / abs(b) for a, b in zip(got[key], ref[key], strict=True))
    for category in CATEGORIES:
        mine, theirs = got["state"][category], ref["state"][category]
        if category == "master" and not (mine and theirs):
            continue  # only the distributed optimizer keeps separate FP32 copies
        assert mine, f"no {category} tensors in the checkpoint"
        assert mine.keys() == theirs.keys(), (category, sorted(mine.keys() ^ theirs.keys()))
        worst = 0.0
        for name, tensor in mine.items():
            assert tensor.shape == theirs[name].shape, (category, name)
            assert tensor.dtype == theirs[name].dtype, (category, name)
            worst = max(worst, _rel(tensor, theirs[name]))
        diffs[category] = worst
    return diffs


def _compare_fp8(got: dict, ref: dict) -> dict[str, float]:
    """The delayed-scaling state (amax histories and scales of every quantised operand):
    ``fp8_tp_ranks``, its worst difference between the ranks of the TP group (all the ranks
    here), and ``fp8_state``, the ranks' against the single-process run."""
    ranks, theirs = got["fp8_ranks"], ref["fp8_ranks"][0]
    assert theirs and all(s is not None for s in theirs), "no delayed-scaling state"
    assert any(s["scale"] != 1.0 for s in theirs), "the scales never moved"
    diffs = {"fp8_tp_ranks": 0.0, "fp8_state": 0.0}
    for states in ranks:
        assert len(states) == len(theirs)
        for mine, first, other in zip(states, ranks[0], theirs, strict=True):
            assert mine["uses"] == first["uses"] == other["uses"]
            for key in ("amax_history", "scale"):
                a, b, c = (torch.tensor(s[key]) for s in (mine, first, other))
                diffs["fp8_tp_ranks"] = max(diffs["fp8_tp_ranks"], _rel(a, b))
                diffs["fp8_state"] = max(diffs["fp8_state"], _rel(a, c))
    return diffs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process runs, one per set of shared overrides, computed once per session."""
    cache: dict[tuple[str, ...], dict] = {}

    def get(overrides: list[str]) -> dict:
        key = tuple(overrides)
        if key not in cache:
            cache[key] = _run(1, overrides, tmp_path_factory.mktemp("ref"))
        return cache[key]

    return get


DENSE, MOE = "model.name=llm-jp-4-tiny-dense", "model.name=llm-jp-4-tiny-moe"
A2A, GATHER, UNEVEN = "all_to_all_single", "all_gather", "all_gather uneven"
LAYOUTS = [
    # (shared with the single-process run, world, layout, compatibility collectives it runs)
    ([DENSE], 2, ["parallel.tp=2"], set()),
    ([DENSE], 2, ["parallel.pp=2"], set()),
    ([DENSE], 2, ["parallel.pp=2", "parallel.vpp=2"], set()),
    ([DENSE], 4, ["parallel.pp=2", "parallel.vpp=2"], set()),
    ([DENSE], 2, ["optim.use_distributed_optimizer=true"], set()),
    ([DENSE], 2, ["optim.use_distributed_optimizer=false"], set()),
    ([DENSE], 4, ["parallel.tp=2", "parallel.pp=2"], set()),
    ([DENSE], 4, ["parallel.tp=2"], set()),
    (
        [DENSE],
        4,
        ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"],
        set(),
    ),
    ([MOE], 2, ["parallel.ep=2"], {A2A}),
    ([MOE], 2, ["parallel.tp=2"], {GATHER}),
    ([MOE], 2, ["parallel.ep=2", "parallel.moe_token_dispatcher=allgather"], set()),
    ([MOE], 4, ["parallel.ep=2", "parallel.tp=2"], {A2A}),
    ([MOE], 4, ["parallel.ep=2", "parallel.tp=2", "parallel.etp=2"], {A2A, GATHER, UNEVEN}),
    ([MOE], 4, ["parallel.ep=2", "parallel.pp=2"], {A2A}),
    ([MOE], 4, ["parallel.ep=4"], {A2A}),
    ([DENSE, *FP8], 2, ["parallel.tp=2"], set()),
]


def _id(shared: list[str], world: int, layout: list[str], _covers=None) -> str:
    name = shared[0].removeprefix("model.name=llm-jp-4-tiny-")
    if "precision.fp8=delayed" in shared:
        name += "-fp8"
    return f"{name}-w{world}-" + "-".join(o.removeprefix("parallel.") for o in layout)


@pytest.mark.parametrize("shared,world,layout,covers", LAYOUTS, ids=[_id(*c) for c in LAYOUTS])
def test_layout_matches_single_process(shared, world, layout, covers, reference, tmp_path):
    ref = reference(shared)
    got = _run(world, [*shared, *layout], tmp_path)
    fp8 = "precision.fp8=delayed" in shared
    diffs = _compare(got, ref)
    if fp8:
        diffs.update(_compare_fp8(got, ref))
    print("max rel diff:", " ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    bounds = FP8_BOUND if fp8 else FP32_BOUND
    for key, diff in diffs.items():
        bound = bounds[key]
        within = diff == 0 if bound == 0 else diff < bound  # a zero bound demands equality
        assert within, (
            f"{key}: max rel diff {diff:.2e} against the single-process run, bound {bound:.0e}"
            + (f"\n{got[key]}\n{ref[key]}" if key in ("loss", "grad_norm") else "")
        )
    # The run must move: identical constant curves would hide a broken optimizer step.
    assert ref["loss"][-1] < ref["loss"][0]
    # The compatibility layer's paths this layout is listed for in the docstring really ran.
    missing = {path for path in covers if not got["collectives"].get(path)}
    assert not missing, f"expected calls of {sorted(missing)}; got {dict(got['collectives'])}"
