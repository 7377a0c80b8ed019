"""CPU compatibility layer: lets megatron-core (0.16.x) run on CPU processes with gloo.

This is the only module that knows megatron-core was written for CUDA, and the one place that
decides the device: ``device_type()`` reads ``LLMJP_DEVICE`` (``cpu`` or ``cuda``; unset:
``cuda`` when torch sees a GPU). ``install()`` is a no-op on ``cuda``; on ``cpu`` it must run
before megatron-core modules are imported (megatron decorates functions with ``torch.compile``
at import time). On ``cpu`` nothing here asks CUDA anything: ``torch.cuda.is_available()`` and
``device_count()`` create no CUDA context but "poison fork" (torch's docs: CUDA then fails in
forked children, unless ``PYTORCH_NVML_BASED_CUDA_CHECK=1``), so a CPU run on a GPU node must
not call them before forking its ranks. What the layer changes, and why:

* A ``TorchFunctionMode`` maps ``device="cuda"``, ``"cuda:N"`` and integer device arguments,
  ``Tensor.cuda()``, ``Tensor.to("cuda")`` and ``pin_memory`` to CPU, and reports CPU tensor
  types as ``torch.cuda.*Tensor`` (megatron's optimizer dispatches on ``tensor.type()``).
  torch runs ``backward()`` with the mode popped, so the mode runs the autograd engine itself
  with the mode pushed (custom autograd functions' backward code creates "cuda" tensors too).
* The CUDA RNG is the CPU generator: megatron's RNG tracker forks "CUDA" states for TP-aware
  dropout and init; on CPU those random draws come from the CPU generator, so that is the state
  to fork. ``torch.cuda._lazy_call`` would queue callbacks forever without CUDA: run them now.
* Streams, events, synchronize and memory statistics get inert stand-ins.
* gloo: ``all_to_all_single`` needs split sizes as lists; ``all_gather`` needs equal sizes
  (megatron's MoE token gather with TP > 1 is uneven: pad to the largest, then trim).
* ``torch.compile`` is disabled: on CPU it would compile with gcc in every process.
* ``torch.cuda.is_available()`` answers False and ``device_count()`` 0, and
  ``CUDA_VISIBLE_DEVICES`` is emptied for child processes: on a GPU node every CUDA branch in
  megatron-core, torch and this package takes its CPU side, and nothing reaches a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Literal

import torch
from torch.overrides import TorchFunctionMode

from megatron_llmjp.config.errors import ConfigError

DEVICE_ENV = "LLMJP_DEVICE"
"""Environment variable choosing the device: ``cpu`` (gloo, megatron-core's local layer spec)
or ``cuda`` (NCCL, Transformer Engine when installed); unset: ``cuda`` when torch sees a GPU."""
DEVICES = ("cpu", "cuda")

_INSTALLED = False
_MODE: _CpuDeviceMode | None = None

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
}


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CpuDeviceMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.backward:
            return self._backward(*args, **_rename(kwargs, gradient="grad_tensors"))
        if func is torch.autograd.backward:
            return self._backward(*args, **kwargs)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)

    def _backward(
        self,
        tensors,
        grad_tensors=None,
        retain_graph=None,
        create_graph=False,
        inputs=None,
        grad_variables=None,
    ):
        """``torch.autograd.backward`` with this mode active while the engine runs.

        torch dispatches ``backward`` to the mode with the mode popped, and calling it again
        inside ``with self`` would dispatch again; so prepare the arguments as torch does and
        run the engine directly. (megatron's pipeline schedules already call the engine
        directly through ``custom_backward``; this covers plain ``loss.backward()``.)
        """
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        if inputs is None:
            inputs = ()
        elif isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        else:
            inputs = tuple(inputs)
        grads = _tensor_or_tensors_to_tuple(
            grad_variables if grad_tensors is None else grad_tensors, len(tensors)
        )
        grads = _make_grads(tensors, grads, is_grads_batched=False)
        with self:
            _engine_run_backward(
                tensors,
                grads,
                create_graph if retain_graph is None else retain_graph,
                create_graph,
                inputs,
                allow_unreachable=True,
                accumulate_grad=True,
            )


def _rename(kwargs: dict, **names: str) -> dict:
    return {names.get(k, k): v for k, v in kwargs.items()}


class _Stream:
    """Inert stand-in for ``torch.cuda.Stream`` (CPU work is synchronous)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cpu_gen = torch.default_generator
    cuda.current_device = lambda: 0
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.manual_seed = lambda seed: cpu_gen.manual_seed(int(seed))
    cuda.random.manual_seed = cuda.manual_seed
    cuda.manual_seed_all = cuda.manual_seed
    cuda.default_generators = (cpu_gen,)
    cuda._lazy_call = lambda cb, **kw: cb()
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_stream = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.set_device = lambda *a, **k: None
    for name in (
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
    ):
        setattr(cuda, name, lambda *a, **k: 0)
    cuda.memory_stats = lambda *a, **k: {}
    cuda.reset_peak_memory_stats = lambda *a, **k: None


def _patch_collectives() -> None:
    dist = torch.distributed
    orig_a2a = dist.all_to_all_single
    orig_all_gather = dist.all_gather

    def all_to_all_single(
        output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return orig_a2a(
            output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op
        )

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        rows = [t.shape[0] if t.dim() else 1 for t in tensor_list]
        if tensor.dim() == 0 or len(set(rows)) == 1:
            return orig_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        # gloo requires equal sizes: pad every contribution to the longest, then trim.
        longest = max(rows)
        pad = tensor.new_zeros((longest, *tensor.shape[1:]))
        pad[: tensor.shape[0]] = tensor
        padded = [tensor.new_empty((longest, *tensor.shape[1:])) for _ in tensor_list]
        orig_all_gather(padded, pad, group=group)
        for out, src, n in zip(tensor_list, padded, rows, strict=True):
            out.copy_(src[:n])
        return None

    dist.all_to_all_single = all_to_all_single
    dist.all_gather = all_gather


def _patch_megatron() -> None:
    from megatron.core import jit

    jit.disable_jit_fuser()
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._lazy_call = lambda cb, **kw: cb()
    # The tracker warns whenever the CPU generator moves inside a fork; on CPU that generator
    # *is* the forked state, so the warning is noise.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def device_type() -> Literal["cpu", "cuda"]:
    """The device this process computes on: ``LLMJP_DEVICE`` when set, else ``cuda`` when
    torch sees a GPU (that query marks the process as using CUDA, see the module docstring).

    Once the CPU layer is installed the answer is ``cpu``. ``cuda`` is not checked against the
    machine here (``parallel.dist.init_distributed`` refuses it without a GPU).

    Raises:
        ConfigError: ``LLMJP_DEVICE`` is set to something other than ``cpu`` or ``cuda``.
    """
    if _INSTALLED:
        return "cpu"
    value = os.environ.get(DEVICE_ENV, "").strip().lower()
    if value in DEVICES:
        return value  # type: ignore[return-value]
    if value:
        raise ConfigError(
            f"{DEVICE_ENV}={os.environ[DEVICE_ENV]!r}: expected 'cpu' or 'cuda' (or unset: "
            "cuda when a GPU is visible)"
        )
    return "cuda" if torch.cuda.is_available() else "cpu"


def pin_cpu() -> None:
    """Keep this process (and the processes it starts) on CPU whatever ``LLMJP_DEVICE`` says,
    without installing the layer: for work on tensors only (conversion, upcycling), which then
    never imports megatron-core. A model check later in the same process still needs
    :func:`force_cpu`.

    Raises:
        ConfigError: CUDA is already initialised in this process.
    """
    if _INSTALLED:
        return
    if torch.cuda.is_initialized():  # reads a flag; initialises nothing
        raise ConfigError(
            "CPU-only work (a conversion or a CPU model check) was started in a process that "
            "already uses CUDA; run it in a "
            f"process of its own (or with {DEVICE_ENV}=cpu)"
        )
    os.environ[DEVICE_ENV] = "cpu"
    _hide_gpus()


def force_cpu() -> None:
    """Compute on CPU in this process whatever ``LLMJP_DEVICE`` says (conversion and other
    model checks outside training), and install the layer.

    Raises:
        ConfigError: CUDA is already initialised in this process (the layer replaces
            ``torch.cuda`` functions that live CUDA code would then miss); run the check in a
            process of its own.
    """
    pin_cpu()
    install()


def _hide_gpus() -> None:
    """CPU mode answers "no GPU" in this process and in the processes it starts."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.cuda.is_available = lambda: False
    torch.cuda.device_count = lambda: 0


def install() -> bool:
    """Activate the layer when ``device_type()`` is ``cpu``. Returns True when it is (or
    already was) active. Raises ``ConfigError`` for a bad ``LLMJP_DEVICE``."""
    global _INSTALLED, _MODE
    if _INSTALLED:
        return True
    if device_type() == "cuda":
        return False
    # The decision holds for ranks and writer processes started from here on.
    os.environ[DEVICE_ENV] = "cpu"
    _hide_gpus()
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    # Expected on CPU, once per process and rank: not worth a screenful each.
    for message in (
        ".*Transformer Engine and Apex are not installed.*",
        "Apex is not installed.*",
        "The .grad attribute of a Tensor that is not a leaf Tensor",
        r"`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        ".*set the environment variable CUDA_DEVICE_MAX_CONNECTIONS.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    from torch import _dynamo

    _dynamo.config.disable = True
    _patch_torch_cuda()
    _patch_collectives()
    _patch_megatron()
    _MODE = _CpuDeviceMode()
    _MODE.__enter__()
    _INSTALLED = True
    return True


def is_active() -> bool:
    return _INSTALLED
