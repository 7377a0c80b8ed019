"""Checkpoints that move between GPU (Transformer Engine layers) and CPU (megatron-core's local
layers) runs, through the real trainer on CPU/gloo.

A GPU run cannot happen here, so its checkpoint is made the way Transformer Engine makes one:
megatron-core's local spec already stores its norms under the TE spec's names (its
``sharded_state_dict_keys_map`` maps ``input_layernorm.`` to ``self_attention.linear_qkv.
layer_norm_`` and ``pre_mlp_layernorm.`` to ``mlp.linear_fc1.layer_norm_``, the parameters
TE's fused ``LayerNormLinear`` holds), and each module TE implements gets TE's ``_extra_state``
(a uint8 tensor of pickled FP8 scaling metadata, as TE's ``get_extra_state`` returns), which
megatron-core stores as one ``ShardedObject`` per module. The manifest then says what a GPU run
would write (device cuda, layer spec transformer_engine).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from megatron_llmjp.checkpoint.store import CheckpointError
from megatron_llmjp.config.loader import build_config
from tests.helpers.spawn import spawn

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BASE = [
    "model.name=llm-jp-4-tiny-dense",
    "data.synthetic=true",
    "model.vocab_size=1000",
    "train.seq_length=64",
    "train.micro_batch_size=1",
    "train.global_batch_size=8",
    "train.iters=6",
    "schedule.warmup_iters=2",
    "logging.tensorboard=false",
]
SEED = 1234  # train.seed's default
SAVED_RNG_SEED = 98765
"""The saving run puts the CPU generator here right before capturing it, so a restored
generator and a re-seeded one are told apart."""

# The modules whose Transformer Engine version stores ``_extra_state`` (megatron-core 0.16
# gpt_layer_specs: TELayerNormColumnParallelLinear for linear_qkv and linear_fc1,
# TERowParallelLinear for linear_proj and linear_fc2, TENorm (TE's RMSNorm, a fusible operation
# with FP8 metadata) for the final norm; TEDotProductAttention's sharded_state_dict stores
# nothing unless the softmax offset is learnable). megatron-core's local linears store an
# ``_extra_state`` of None under the same keys ("compatibility with TE state dict"); the
# local spec's norms store none.
TE_LINEARS = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
TE_ONLY = ("decoder.final_layernorm",)
# The TE spec's parameter names of a dense layer (TE LayerNormLinear: weight, layer_norm_weight).
TE_LAYER_TENSORS = {
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.self_attention.linear_qkv.weight",
    "decoder.layers.self_attention.linear_proj.weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.mlp.linear_fc1.weight",
    "decoder.layers.mlp.linear_fc2.weight",
}

_EVENTS: list = []
"""What happened in this rank (forked, so per run): RNG states, ``set_extra_state`` calls."""


class _TEExtraState:
    """Gives a local module Transformer Engine's ``get_extra_state``/``set_extra_state``."""

    def get_extra_state(self) -> torch.Tensor:
        state = {
            "scale_fwd": torch.ones(3),
            "amax_history_fwd": torch.zeros(16, 3),
            "extra_fp8_variables": {"num_gemms": 1},
        }
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        _EVENTS.append(("set_extra_state", state))


def _with_te_extra_state(build):
    def wrapped(cfg, layout):
        chunks = build(cfg, layout)
        classes: dict[type, type] = {}
        for chunk in chunks:
            for name, module in chunk.named_modules():
                if name.endswith(TE_LINEARS) or name in TE_ONLY:
                    cls = type(module)
                    if cls not in classes:
                        classes[cls] = type(f"TE{cls.__name__}", (_TEExtraState, cls), {})
                    module.__class__ = classes[cls]
        return chunks

    return wrapped


def _run(overrides: list[str], te_layers: bool = False, loading_spec: str | None = None):
    """One training run on this rank; returns the logging rank's curves and the events."""
    from megatron_llmjp.checkpoint import state
    from megatron_llmjp.models import build
    from megatron_llmjp.training.trainer import run

    if te_layers:
        build.build_model_chunks = _with_te_extra_state(build.build_model_chunks)
    if loading_spec is not None:  # what models.build would choose on a GPU node
        writer_section = state.writer_section
        state.writer_section = lambda cfg: {**writer_section(cfg), "layer_spec": loading_spec}
    capture, load = state._capture_rng, state.load_checkpoint

    def capture_at_save():
        torch.manual_seed(SAVED_RNG_SEED)
        return capture()

    def load_and_record(*args, **kwargs):
        progress = load(*args, **kwargs)
        _EVENTS.append(("rng_after_load", torch.get_rng_state().numpy().tobytes()))
        return progress

    state._capture_rng, state.load_checkpoint = capture_at_save, load_and_record
    result = run(build_config(overrides=BASE + overrides))
    return {
        "loss": [r["loss"] for r in result.history],
        "grad_norm": [r["grad_norm"] for r in result.history],
        "iteration": result.progress.iteration,
        "events": list(_EVENTS),
    }


def train(
    world: int,
    overrides: list[str],
    out: Path,
    te_layers: bool = False,
    loading_spec: str | None = None,
    timeout: float = 240.0,
) -> dict:
    """``_run`` on ``world`` fresh ranks; the logging rank's result."""
    args = ([*overrides, f"output_dir={out}"], te_layers, loading_spec)
    return spawn(_run, world, *args, timeout=timeout)[-1]


def _edit_manifest(ckpt: Path, **fields) -> dict:
    path = ckpt / "iter_0000003" / "manifest.json"
    manifest = json.loads(path.read_text())
    before = {k: manifest.get(k) for k in fields}
    manifest.update(fields)
    path.write_text(json.dumps(manifest))
    return before


def _stored_keys(directory: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(directory)).read_metadata().state_dict_metadata)


def _seeded_state(seed: int) -> bytes:
    """torch's CPU generator state for ``seed``, as the bytes ``_run`` reports."""
    return torch.Generator().manual_seed(seed).get_state().numpy().tobytes()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    cache: dict = {}

    def get(world: int, overrides: list[str]) -> dict:
        key = (world, tuple(overrides))
        if key not in cache:
            cache[key] = train(world, overrides, tmp_path_factory.mktemp("straight"))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def cpu_checkpoint(tmp_path_factory) -> Path:
    """A local-spec checkpoint at iteration 3 (one rank), RNG captured at SAVED_RNG_SEED."""
    root = tmp_path_factory.mktemp("cpu_ckpt")
    train(1, [f"checkpoint.dir={root / 'ckpt'}", "train.iters=3"], root / "run")
    return root / "ckpt"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_transformer_engine_checkpoint_resumes_exactly_on_cpu(straight, tmp_path, capfd):
    """TP2: TE-style ``_extra_state`` entries and TE key names, manifest from a GPU run; the
    CPU (local spec) run resumes with the straight run's losses, RNG re-seeded."""
    layout = ["parallel.tp=2"]
    ref = straight(2, layout)
    ckpt = tmp_path / "ckpt"
    first = train(
        2, [*layout, f"checkpoint.dir={ckpt}", "train.iters=3"], tmp_path / "a", te_layers=True
    )
    stored = _stored_keys(ckpt / "iter_0000003")
    extra = {k.split("/")[0] for k in stored if "_extra_state" in k}
    assert extra == {f"decoder.layers.{m}._extra_state" for m in TE_LINEARS} | {
        f"{m}._extra_state" for m in TE_ONLY
    }
    assert stored >= TE_LAYER_TENSORS
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in stored)
    saved = _edit_manifest(ckpt, device="cuda", layer_spec="transformer_engine")
    assert saved == {"device": "cpu", "layer_spec": "local"}
    capfd.readouterr()
    second = train(2, [*layout, f"checkpoint.dir={ckpt}"], tmp_path / "b")
    out = capfd.readouterr().out
    assert first["iteration"] == 3 and second["iteration"] == 6
    for key in ("loss", "grad_norm"):
        assert first[key] + second[key] == ref[key], f"{key} differs after resume"
    lines = [x for x in out.splitlines() if "RNG re-seeded" in x]
    assert len(lines) == 1 and "saved on cuda" in lines[0] and "this run is on cpu" in lines[0]
    # The re-seeded CPU generator is torch's for train.seed, not the saved one.
    (rng,) = [v for k, v in second["events"] if k == "rng_after_load"]
    assert rng == _seeded_state(SEED)


def test_rng_is_restored_only_on_the_device_type_that_saved_it(
    cpu_checkpoint, straight, tmp_path, capfd
):
    ref = straight(1, [])
    same = _copy(cpu_checkpoint, tmp_path / "same")
    capfd.readouterr()
    got = train(1, [f"checkpoint.dir={same}"], tmp_path / "a")
    assert "RNG re-seeded" not in capfd.readouterr().out
    (rng,) = [v for k, v in got["events"] if k == "rng_after_load"]
    assert rng == _seeded_state(SAVED_RNG_SEED)

    cuda = _copy(cpu_checkpoint, tmp_path / "cuda")
    _edit_manifest(cuda, device="cuda")
    got = train(1, [f"checkpoint.dir={cuda}"], tmp_path / "b")
    out = capfd.readouterr().out
    assert sum("RNG re-seeded with train.seed=1234" in x for x in out.splitlines()) == 1
    (rng,) = [v for k, v in got["events"] if k == "rng_after_load"]
    assert rng == _seeded_state(SEED)
    assert rng != _seeded_state(SAVED_RNG_SEED)
    assert got["loss"] == ref["loss"][3:]  # dropout 0: the streams do not touch the losses


def test_local_checkpoint_resumes_into_transformer_engine_layers(
    cpu_checkpoint, straight, tmp_path
):
    """The other way: TE-style layers load a local-spec checkpoint, which holds no final-norm
    ``_extra_state`` (that layer keeps its own) and None for the linears'. A checkpoint that
    claims TE layers but lacks an entry is refused."""
    ref = straight(1, [])
    ckpt = _copy(cpu_checkpoint, tmp_path / "local")
    got = train(
        1,
        [f"checkpoint.dir={ckpt}"],
        tmp_path / "a",
        te_layers=True,
        loading_spec="transformer_engine",
    )
    assert got["iteration"] == 6
    assert got["loss"] == ref["loss"][3:]
    # The linears get the local spec's None (TE's set_extra_state returns on None); the final
    # norm, absent from the checkpoint, gets nothing: no FP8 metadata is made up.
    applied = [state for kind, state in got["events"] if kind == "set_extra_state"]
    assert len(applied) == 4 * len(TE_LINEARS) and all(s is None for s in applied)

    broken = _copy(cpu_checkpoint, tmp_path / "claims_te")
    _edit_manifest(broken, layer_spec="transformer_engine")
    with pytest.raises(RuntimeError) as e:
        train(
            1,
            [f"checkpoint.dir={broken}"],
            tmp_path / "b",
            te_layers=True,
            loading_spec="transformer_engine",
            timeout=120,
        )
    assert CheckpointError.__name__ in str(e.value)
    assert "lacks 1 tensors" in str(e.value) and "decoder.final_layernorm._extra_state" in str(
        e.value
    )
