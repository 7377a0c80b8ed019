"""The test suite, conversion and upcycling on a GPU node: the CPU side never touches CUDA.

No GPU is needed: a GPU node is imitated by a pytest plugin (or a preamble) loaded before
anything else, which makes ``torch.cuda.is_available()`` answer True and ``device_count()`` 8,
and records every call to them and to ``torch.cuda._lazy_init`` (through which torch creates
the CUDA context, from Python or C++) into a log file; ``_lazy_init`` also raises. torch
documents that ``is_available``/``device_count`` initialise the driver (forked children then
cannot use CUDA) unless ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, and that the context is created
lazily on first use: the CPU path must make none of these calls.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import selects_only_gpu_tests
from tests.helpers.spawn import spawn

REPO = Path(__file__).resolve().parents[2]

FAKE_GPU_NODE = '''
"""A GPU node as torch reports it; every CUDA query or initialisation is logged."""
import os

import torch

_LOG = os.environ["FAKE_CUDA_LOG"]


def _record(name):
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {name}\\n")


def _answer(name, value):
    def fake(*args, **kwargs):
        _record(name)
        return value

    return fake


def _lazy_init(*args, **kwargs):
    _record("_lazy_init")
    raise RuntimeError("CUDA initialised on the CPU path")


torch.cuda.is_available = _answer("is_available", True)
torch.cuda.device_count = _answer("device_count", 8)
torch.cuda._lazy_init = _lazy_init
torch.cuda.init = _lazy_init
'''


def _gpu_node(tmp_path: Path, **env: str) -> tuple[dict, Path]:
    """Environment of a fresh process on the imitated GPU node (no device switch set, as in a
    plain shell), and its log file."""
    (tmp_path / "fake_gpu_node.py").write_text(FAKE_GPU_NODE)
    log = tmp_path / "cuda_calls.log"
    log.write_text("")
    base = {
        k: v for k, v in os.environ.items() if k not in ("LLMJP_DEVICE", "CUDA_VISIBLE_DEVICES")
    }
    base.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]),
        FAKE_CUDA_LOG=str(log),
        **env,
    )
    return base, log


def _calls(log: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]


@pytest.mark.parametrize(
    "expr,gpu_only",
    [
        ("gpu", True),
        ("gpu and not slow", True),
        ("(gpu)", True),
        ("", False),
        ("not slow", False),
        ("slow", False),
        ("not gpu", False),
        ("gpu or not gpu", False),
        ("gpu or slow", False),  # keeps the slow CPU tests too
        ("gpu and", False),  # unparsable: pytest reports it; CPU mode meanwhile
    ],
)
def test_marker_expressions_choose_the_device(expr, gpu_only):
    assert selects_only_gpu_tests(expr) is gpu_only


def _train_two_steps() -> dict:
    """A rank of a 2-rank CPU run: what the process group, the model and the layer choice
    were, and the logged losses."""
    import types

    import torch

    from megatron_llmjp.config.loader import build_config
    from megatron_llmjp.models import build
    from megatron_llmjp.parallel import dist
    from megatron_llmjp.training.trainer import run

    seen: dict = {}
    init_pg, build_chunks = torch.distributed.init_process_group, build.build_model_chunks

    def init_process_group(*args, **kwargs):
        seen["backend"] = kwargs.get("backend")
        return init_pg(*args, **kwargs)

    def build_model_chunks(cfg, layout):
        chunks = build_chunks(cfg, layout)
        seen["param_devices"] = sorted({p.device.type for c in chunks for p in c.parameters()})
        seen["modules"] = sorted({type(m).__module__.split(".")[0] for m in chunks[0].modules()})
        return chunks

    torch.distributed.init_process_group = init_process_group
    build.build_model_chunks = build_model_chunks
    cfg = build_config(
        overrides=[
            "model.name=llm-jp-4-tiny-dense",
            "model.vocab_size=1000",
            "data.synthetic=true",
            "train.seq_length=32",
            "train.micro_batch_size=1",
            "train.global_batch_size=2",
            "train.iters=2",
            "logging.tensorboard=false",
            "checkpoint.dir=null",
            "parallel.tp=2",
        ]
    )
    result = run(cfg)
    # Transformer Engine importable (a stand-in module): the CPU switch still says no.
    sys.modules["transformer_engine"] = types.ModuleType("transformer_engine")
    try:
        seen["te"] = build.use_transformer_engine(cfg)
    finally:
        del sys.modules["transformer_engine"]
    seen["local_device"] = dist.local_device()
    seen["loss"] = [r["loss"] for r in result.history]
    seen["cuda_initialized"] = torch.cuda.is_initialized()
    return seen


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_ranks_train_with_gloo_and_local_layers():
    ranks = spawn(_train_two_steps, 2)
    for r in ranks:
        assert r["backend"] == "gloo"
        assert r["param_devices"] == ["cpu"] and r["local_device"] == "cpu"
        assert r["te"] is False and "transformer_engine" not in r["modules"]
        assert r["cuda_initialized"] is False
    # Initial weights of std 0.02: next-token probabilities close to uniform over the
    # vocabulary, so the first loss is close to ln(1000).
    first = ranks[-1]["loss"][0]
    assert abs(first - math.log(1000)) < 0.1


@pytest.mark.slow
@pytest.mark.distributed
def test_pytest_on_a_gpu_node_runs_cpu_tests_without_touching_cuda(tmp_path):
    """``pytest`` on the imitated GPU node: the CPU tests (the compatibility layer, a forked
    2-rank training run) pass with no CUDA call at all, and a GPU test is skipped pointing at
    ``pytest -m gpu``; ``pytest -m gpu`` there asks CUDA and selects the GPU tests only."""
    env, log = _gpu_node(tmp_path)
    gpu_test = "tests/gpu/test_gpu_train.py::test_transformer_engine_spec_is_selected"
    cmd = [sys.executable, "-m", "pytest", "-p", "fake_gpu_node", "-p", "no:cacheprovider"]
    cmd += ["-q", "-rs", "--timeout=300"]
    cpu_tests = [
        "tests/unit/test_cpu_compat.py",
        f"{__file__}::test_cpu_ranks_train_with_gloo_and_local_layers",
    ]
    proc = subprocess.run(
        [*cmd, *cpu_tests, gpu_test], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "6 passed, 1 skipped" in proc.stdout
    assert "run the GPU tests alone with `pytest -m gpu`" in proc.stdout
    assert _calls(log) == []

    proc = subprocess.run(
        [*cmd, "-m", "gpu", "tests/unit/test_cpu_compat.py", gpu_test],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # The GPU test ran (and skipped itself: no Transformer Engine here); the CPU ones were
    # deselected.
    assert "1 skipped, 5 deselected" in proc.stdout
    assert "transformer_engine" in proc.stdout
    assert "is_available" in _calls(log)


@pytest.mark.slow
def test_device_switch_values_and_cuda_without_a_gpu(tmp_path):
    """A bad ``LLMJP_DEVICE`` and ``cuda`` on a machine without a GPU are ConfigErrors naming
    the variable, raised before any process group."""
    script = textwrap.dedent(
        """
        import json, os
        import torch
        from megatron_llmjp.config.errors import ConfigError
        from megatron_llmjp.parallel import cpu_compat, dist
        from megatron_llmjp.parallel.layout import Layout

        out = {}
        os.environ["LLMJP_DEVICE"] = "gpu"
        try:
            cpu_compat.device_type()
        except ConfigError as e:
            out["bad"] = str(e)
        os.environ["LLMJP_DEVICE"] = "CUDA"
        out["cuda"] = cpu_compat.device_type()
        layout = Layout(1, tp=1, pp=1, vpp=None, cp=1, ep=1, etp=1, dp=1, sequence_parallel=False)
        try:
            dist.init_distributed(dist.RankInfo(0, 0, 1, "single"), layout, 1.0)
        except ConfigError as e:
            out["no_gpu"] = str(e)
        out["pg"] = torch.distributed.is_initialized()
        print(json.dumps(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LLMJP_DEVICE", "CUDA_VISIBLE_DEVICES")}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "LLMJP_DEVICE='gpu'" in out["bad"] and "expected 'cpu' or 'cuda'" in out["bad"]
    assert out["cuda"] == "cuda"
    assert "LLMJP_DEVICE=cuda but torch sees no GPU" in out["no_gpu"]
    assert out["pg"] is False


CONVERSION = """
import fake_gpu_node  # first: the imitated GPU node

import json, os, sys
from pathlib import Path

import torch
import transformers

from megatron_llmjp.convert import driver
from megatron_llmjp.parallel import cpu_compat
from megatron_llmjp.upcycle.driver import UpcycleSpec, upcycle

tmp = Path(sys.argv[1])
torch.manual_seed(0)
cfg = transformers.LlamaConfig(
    vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=500000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    pad_token_id=4,
)
transformers.LlamaForCausalLM(cfg).save_pretrained(tmp / "hf")
calls = lambda: Path(os.environ["FAKE_CUDA_LOG"]).read_text().split()[1::2]
out = {"switch": os.environ["LLMJP_DEVICE"], "calls_at_start": calls()}
driver.hf_to_mcore(tmp / "hf", tmp / "dense", parity=False, progress=False)
import_done = "megatron.core" in sys.modules
out["after_import"] = {"device": cpu_compat.device_type(), "megatron_core": import_done}
upcycle(tmp / "dense", tmp / "moe", UpcycleSpec(num_experts=2, topk=1, expert_ffn=48),
        progress=False)
report = driver.mcore_to_hf(tmp / "dense", tmp / "back", progress=False)
out["parity"] = report.parity is not None
out["calls"] = calls()
for name in ("dense", "moe"):
    m = json.loads((tmp / name / "iter_0000000" / "manifest.json").read_text())
    out[name] = [m["device"], m["layer_spec"]]
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_conversion_and_upcycling_run_on_cpu_when_cuda_is_asked_for(tmp_path):
    """``LLMJP_DEVICE=cuda`` on the imitated GPU node: HF import, upcycling and export (with
    its parity check, whose megatron model is built on CPU) all run on CPU; CUDA is never
    initialised. (Without forcing the CPU, torch's checkpoint writer opens a CUDA stream.)"""
    pytest.importorskip("transformers")
    env, log = _gpu_node(tmp_path, LLMJP_DEVICE="cuda")
    (tmp_path / "convert.py").write_text(CONVERSION)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "convert.py"), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["switch"] == "cuda"
    # On CPU without megatron-core (a tensors-only import needs neither it nor its start-up).
    assert out["after_import"] == {"device": "cpu", "megatron_core": False}
    assert out["parity"] is True
    # transformers asks whether CUDA is there when imported (before the conversion starts);
    # nothing initialises it.
    assert set(out["calls"]) <= {"is_available", "device_count"}
    assert out["calls"] == out["calls_at_start"] == _calls(log)
    # Written without a model: the manifests say so.
    assert out["dense"] == ["cpu", None] and out["moe"] == ["cpu", None]
