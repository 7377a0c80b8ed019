"""Typed run configuration.

One precedence: dataclass defaults < YAML file < ``--set section.key=value`` overrides.
Every field is documented where it is declared; the resolved config is written to the
run directory as ``config.yaml`` so a run can always be reproduced from its own output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of the model. ``name`` selects a registry entry; any other key set here
    overrides that entry's value (e.g. ``--set model.num_layers=4`` for a shallow debug run)."""

    name: str = "llm-jp-4-tiny-dense"
    """Registry name (see ``llmjp-params --list``)."""
    family: Literal["dense", "moe"] = "dense"
    """``dense`` exports as LlamaForCausalLM, ``moe`` as Qwen3MoeForCausalLM."""
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int | None = 256
    """Intermediate size of the dense SwiGLU FFN (None for MoE models without dense layers)."""
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """Number of key/value heads (GQA)."""
    kv_channels: int = 16
    """Head dimension, independent of hidden_size / num_attention_heads (32B-A3B: 128, not 64)."""
    vocab_size: int = 196608
    """True tokenizer vocabulary; the embedding is padded for TP inside the model only."""
    make_vocab_size_divisible_by: int = 128
    """The padded vocabulary is a multiple of this times the TP size (Megatron convention)."""
    max_position_embeddings: int = 4096
    rotary_base: float = 500000.0
    norm_epsilon: float = 1e-6
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (the MoE family)."""
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02
    num_experts: int | None = None
    """Routed experts per MoE layer; None for dense models."""
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int = 1
    moe_norm_topk_prob: bool = True
    """Renormalise the top-k routing probabilities to sum to 1 (HF ``norm_topk_prob``)."""
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float = 0.0
    moe_router_dtype: Literal["fp32", "native"] = "fp32"
    source: str = ""
    """Where the registry numbers come from."""
    hf_config: str = ""
    """JSON object: the ``config.json`` fields of the Hugging Face release this model was
    imported from (``llmjp-convert hf-to-mcore``) that the architecture does not determine, e.g.
    Qwen3-MoE's ``intermediate_size`` (a dense FFN size no layer uses). ``mcore-to-hf`` writes
    them back. Empty for models not imported from Hugging Face."""

    @property
    def is_moe(self) -> bool:
        return self.family == "moe"


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel layout. The data parallel size is derived, dp = world / (tp * pp * cp); for MoE,
    ep * etp must divide tp * cp * dp (experts are sharded over the ranks of one stage)."""

    tp: int = 1
    """Tensor parallel size."""
    pp: int = 1
    """Pipeline parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages (model chunks) per pipeline rank, megatron-core's
    ``virtual_pipeline_model_parallel_size``. LLM-jp-4 332B (80 layers, pp=4, 4 layers per
    virtual stage) uses vpp=5. None or 1 disables the interleaved schedule."""
    cp: int = 1
    """Context parallel size (needs Transformer Engine attention: GPU only)."""
    ep: int = 1
    """Expert parallel size."""
    etp: int | None = None
    """Expert tensor parallel size. None means 1 when ep > 1 (LLM-jp's ETP1) and tp when ep == 1
    (megatron-core then treats expert weights as dense ones, so they must be split like them)."""
    sequence_parallel: bool | None = None
    """Sequence parallelism over the TP group; None enables it whenever tp > 1."""
    moe_token_dispatcher: Literal["alltoall", "allgather", "flex"] = "alltoall"
    """megatron-core's ``moe_token_dispatcher_type``. ``flex`` is the DeepEP dispatcher
    (``moe_flex_dispatcher_backend=deepep``): one fused all-to-all over the tp x ep ranks; it
    needs the ``deep_ep`` package, a Hopper or newer GPU, tp * ep > 1 and FP32 routing."""
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    preflight: bool = False
    """Before training, time all-reduces per node, per rail and over the world, print the bus
    bandwidths and stop (exit 5) naming a slow or broken group."""
    preflight_min_busbw_gbps: float = 0.0
    """Absolute floor for every preflight group in GB/s (0: only the relative check)."""
    preflight_rel_tolerance: float = 0.5
    """A preflight group fails below this fraction of the median of its kind."""
    timeout_minutes: float = 10.0
    """Collective timeout: a rank that stops answering (hung or dead) turns into an error on
    the others instead of a hang. Must cover the slowest collective, e.g. a checkpoint save."""


@dataclass(kw_only=True)
class PrecisionConfig:
    """Numeric precision: BF16/FP32 and optional FP8 GEMMs (mapped onto megatron-core and
    Transformer Engine in ``megatron_llmjp/precision/recipes.py``, validated there too)."""

    dtype: Literal["fp32", "bf16"] = "fp32"
    """Parameter and activation dtype. BF16 keeps FP32 master weights in the optimizer."""
    grad_reduce_in_fp32: bool = True
    fp8: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] | None = None
    """FP8 recipe for the GEMMs of the transformer layers (null: no FP8; needs dtype=bf16).
    ``delayed``: one scale per tensor from an amax history; ``tensorwise``: one scale per tensor
    from the current amax; ``blockwise``: 1x128 blocks for activations and gradients, 128x128
    for weights (DeepSeek-V3; Hopper+); ``mxfp8``: 32-element blocks with power-of-two scales
    (Blackwell only with TE)."""
    fp8_format: Literal["e4m3", "hybrid"] = "hybrid"
    """``e4m3`` everywhere, or ``hybrid``: e4m3 forward, e5m2 for the output gradients."""
    fp8_margin: int = 0
    """Delayed scaling: scale = fp8_max / amax / 2**margin (headroom against growth)."""
    fp8_interval: int = 1
    """Delayed scaling: steps between scale updates (TE >= 1.8 ignores it; the emulated
    backend honours it)."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax values remembered per tensor."""
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "max"
    """Delayed scaling: the amax a scale is computed from, the newest or the window maximum."""
    fp8_wgrad: bool = True
    """False: the weight-gradient GEMM runs in higher precision (unquantised inputs)."""
    fp8_param_gather: bool = False
    """Keep weights in FP8 and all-gather them in FP8 (megatron's ``fp8_param``); needs
    ``optim.use_distributed_optimizer`` and the ``te`` backend."""
    bf16_first_layers: int = 0
    """Keep this many transformer layers at the start of the model in BF16 (no FP8)."""
    bf16_last_layers: int = 0
    """Keep this many transformer layers at the end of the model in BF16 (no FP8)."""
    fp8_backend: Literal["te", "emulated"] = "te"
    """``te``: Transformer Engine FP8 kernels (CUDA, sm_89+). ``emulated``: the local linear
    layers quantise their GEMM inputs to torch's float8 dtypes and back (CPU or GPU; slow, for
    numerics studies at small scale and harness tests only)."""


@dataclass(kw_only=True)
class RecomputeConfig:
    """Activation recompute, megatron-core's ``recompute_*`` settings (mapped onto
    ``TransformerConfig`` in ``megatron_llmjp/models/recompute.py``; ``llmjp-plan`` reads the
    same fields and prints its suggestions as ``--set recompute.*`` overrides). Recompute
    changes memory and step time, never the numbers: every setting trains bitwise like
    ``none``."""

    granularity: Literal["none", "selective", "full"] = "none"
    """``selective``: recompute the submodules in ``modules``; ``full``: whole transformer
    layers (needs ``method`` and ``num_layers``; keeps only each checkpoint's input)."""
    modules: list[str] | None = None
    """Selective recompute only: megatron-core 0.16.1's ``recompute_modules`` names
    (``core_attn``, ``mlp``, ``moe_act``, ``layernorm``, ``moe``, ``shared_experts``,
    ``mla_up_proj``), each listed once; None: megatron-core's default, ``[core_attn]``.
    ``mlp`` is for dense models, ``moe``/``moe_act`` for MoE ones; LLM-jp-4 models have no
    shared experts or MLA. ``layernorm`` and ``moe_act`` need Transformer Engine (GPU; on CPU
    use ``core_attn``, ``mlp``, ``moe``); ``moe_act`` needs grouped GEMM, neither works with
    FP8 delayed scaling, and with TE ``layernorm`` recomputes only the MoE pre-MLP norm (dense
    norms are fused into the next linear). LLM-jp-4 332B uses ``[moe_act, layernorm]``."""
    method: Literal["uniform", "block"] | None = None
    """Full recompute only: ``uniform`` recomputes groups of ``num_layers`` layers; ``block``
    the first ``num_layers`` layers of each pipeline stage (chunk); the other layers keep
    their activations."""
    num_layers: int | None = None
    """Full recompute only: layers per group (uniform, must divide the layers of a pipeline
    chunk, ``model.num_layers / (pp * vpp)``) or per chunk (block, at most that many)."""


@dataclass(kw_only=True)
class PerformanceConfig:
    """megatron-core's performance switches, mapped onto ``TransformerConfig`` in
    ``megatron_llmjp/models/performance.py`` (checked in ``config/performance_checks.py``).
    None means the device default: on a GPU with Transformer Engine what Megatron-LM uses for
    these models where TE supports it, everything off on CPU. Asking for a CUDA-only switch
    on CPU, or for one the machine's TE / apex / DeepEP cannot run, is refused before any
    process group exists."""

    gradient_accumulation_fusion: bool | None = None
    """Accumulate weight gradients into the FP32 ``main_grad`` inside the wgrad GEMM
    (megatron-core's ``gradient_accumulation_fusion``). Default: on with TE when apex's
    ``fused_weight_gradient_mlp_cuda`` is installed (the output layer needs it)."""
    cross_entropy_loss_fusion: bool | None = None
    """megatron-core's fused vocab-parallel cross entropy (``cross_entropy_fusion_impl``
    native). Default: on with TE."""
    moe_permute_fusion: bool | None = None
    """TE's fused token permutation in the MoE dispatcher (TE >= 2.1). Default: on for MoE
    models with TE."""
    moe_grouped_gemm: bool | None = None
    """All local experts in one grouped GEMM (TE's ``GroupedLinear``). Default: on for MoE
    models with TE; ``recompute.modules: [moe_act]`` needs it."""
    tp_comm_overlap: bool | None = None
    """Overlap the tensor-parallel all-gathers/reduce-scatters with GEMMs through TE's
    userbuffers (needs tp > 1, sequence parallelism, BF16). Default: off, as in Megatron-LM."""
    overlap_p2p_comm: bool | None = None
    """Overlap the pipeline's p2p sends/receives with compute in the interleaved schedule
    (needs pp > 1 and vpp > 1; sets megatron-core's ``batch_p2p_comm`` false). Default: on
    on GPU whenever the interleaved schedule is used, as in Megatron-LM."""
    attention_backend: Literal["auto", "flash", "fused", "unfused", "local"] = "auto"
    """megatron-core's ``AttnBackend``: ``auto`` lets Transformer Engine choose among flash,
    fused and unfused attention on GPU and means ``local`` (megatron-core's own attention)
    without TE; ``local`` is refused with TE's layers, the TE kernels without them."""
    manual_gc_interval: int = 0
    """Disable Python's automatic garbage collector and collect by hand every N steps, on
    every rank at the same step (Megatron-LM's ``manual_gc`` option): no rank stalls in a
    collection the others do not make. 0: automatic GC."""


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with decoupled weight decay (LLM-jp-4 values as defaults)."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clipping; 0 disables."""
    use_distributed_optimizer: bool = True


@dataclass(kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule: megatron-core's ``OptimizerParamScheduler`` in samples
    (``iters * train.global_batch_size``), positioned by the samples consumed before each step
    (``training/lr_schedule.py``). Nothing about it is restored from checkpoints, so changing
    these values on resume always takes effect."""

    style: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_iters: int = 0
    decay_iters: int | None = None
    """End of the decay (every style): default ``train.iters``. Iteration ``decay_iters + 1``
    and later apply ``optim.min_lr``."""
    wsd_decay_iters: int = 0
    """WSD: length of the final decay phase, ending at ``decay_iters``."""
    wsd_decay_style: Literal["linear", "cosine", "minus_sqrt", "exponential"] = "minus_sqrt"


@dataclass(kw_only=True)
class DataConfig:
    tokenizer: str = "../shared/data/tokenizer/llm-jp-tokenizer-v4.0"
    """SentencePiece model file, or a directory holding one."""
    text_files: list[str] = field(
        default_factory=lambda: [
            "../shared/data/corpus/ja-jnli-v1.1-train.txt",
            "../shared/data/corpus/en-tinyshakespeare.txt",
        ]
    )
    """Plain-text files tokenised on the fly (one document per non-empty line)."""
    max_bytes_per_file: int = 2_000_000
    """Read at most this many bytes of each file (keeps start-up fast on CPU)."""
    synthetic: bool = False
    """Random tokens instead of text (no tokenizer needed): for layout and unit tests."""
    mixture: str | None = None
    """Mixture file (see ``data/mixture.py``): train on megatron indexed datasets built with
    ``llmjp-preprocess``, blended by megatron-core; ``text_files`` is then not used."""
    stage: str | None = None
    """Stage of the mixture to train (optional when it defines one). A run resumed from a
    checkpoint of another stage starts the new stage's data from its beginning."""
    split: str = "98,2,0"
    """Train/valid/test split of every source, in documents (megatron-core's ``split``)."""
    cache_dir: str | None = None
    """Where megatron-core caches the dataset indices; default ``OUTPUT_DIR/dataset_cache``."""
    seed: int | None = None
    """Seed for the sample order; None uses ``train.seed``."""
    null_tokenizer_vocab_size: int | None = None
    """Megatron-LM's ``--tokenizer-type NullTokenizer --vocab-size N`` for a mixture of indexed
    datasets that need no tokenizer: ids 0..N-1, EOD = N, no padding id (vocabulary N + 1).
    Replaces ``data.tokenizer`` (which is then not read)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Distributed checkpoints (megatron-core ``dist_checkpointing``, ``torch_dist`` format).

    A run whose ``dir`` already holds a checkpoint resumes from its latest one (the ``latest``
    file); otherwise ``load`` (if set) is the starting point. Each save is written to
    ``iter_NNNNNNN.tmp`` and renamed to ``iter_NNNNNNN`` only when every rank has finished."""

    dir: str | None = None
    """Where checkpoints are saved and resumed from; None disables saving. A relative path is
    inside ``output_dir`` (``checkpoints`` -> ``OUTPUT_DIR/checkpoints``), so ``--output-dir``
    moves them with the run; only an absolute path is shared between runs."""
    interval: int = 0
    """Save every N iterations (0: only at the end, on a signal and after the last step)."""
    load: str | None = None
    """Checkpoint to start from when ``dir`` holds none: a checkpoint root (with ``latest``) or
    one ``iter_NNNNNNN`` directory."""
    load_optimizer: bool = True
    """Restore optimizer state, iteration and data position; False loads the weights only and
    starts at iteration 0 (fine-tuning or continued pre-training from released weights)."""
    async_save: bool = False
    """Write shards in a background process while training continues; the checkpoint is
    published at a later step once every rank has finished writing."""
    optimizer_sharding: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """How the distributed optimizer's state is saved (megatron-core's
    ``distrib_optim_sharding_type``; ignored with ``optim.use_distributed_optimizer=false``).
    ``dp_reshardable`` (Megatron-LM's default): every rank writes its own shards of the
    optimizer buffers with no communication, so an asynchronous save barely blocks training;
    a resume with optimizer state may change only the data-parallel size (tp, pp, vpp, cp, ep
    and etp must be those of the save; otherwise resume with ``load_optimizer=false``), and
    only while megatron-core's gradient buckets stay the same (for a model larger than one
    bucket: the same ``parallel.overlap_grad_reduce``, and with it on, no data-parallel size
    above 40 on either side, as the bucket size is max(4e7, 1e6 * dp) elements). Both are
    checked at start-up, before any process group, from the checkpoint's manifest.
    ``fully_reshardable`` (Megatron-LM's ``--dist-ckpt-optim-fully-reshardable``): the state
    is gathered onto data-parallel rank 0 inside every save call (training waits for it, also
    with ``async_save``) and stored per parameter, so any layout may resume it. A resume reads
    the form the checkpoint was saved in, whatever this field says."""
    save_at_end: bool = True
    keep_last: int | None = None
    """Delete older published checkpoints beyond the newest N (None keeps all)."""


@dataclass(kw_only=True)
class FaultConfig:
    """What happens on a non-finite step, a loss spike or a scheduler signal."""

    nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/Inf loss or gradient: ``stop`` reports the step and ranks and exits non-zero with
    the weights untouched; ``skip`` drops the update, counts it and goes on."""
    max_skipped_steps: int = 10
    """With ``skip``: stop once this many steps have been skipped in the run."""
    loss_spike_factor: float = 0.0
    """Log a loss spike when the loss exceeds this factor times the mean of the previous
    ``loss_spike_window`` steps (0 disables); spikes are counted, never skipped."""
    loss_spike_window: int = 20
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make every rank save a checkpoint (if ``checkpoint.dir`` is set) and exit 0
    after the current step: the scheduler's walltime or pre-emption warning."""


@dataclass(kw_only=True)
class LoggingConfig:
    interval: int = 1
    """Log every N iterations to stdout, ``metrics.jsonl`` and TensorBoard."""
    tensorboard: bool = True
    gpu_telemetry: bool = True
    """Per-rank GPU utilisation, memory, power, temperature and throttling via NVML at the
    logging interval (one info line and nothing else where NVML is missing)."""
    wandb_project: str | None = None
    """Weights & Biases project; set it to log the same scalars as TensorBoard and the resolved
    config to W&B from the logging rank (needs the ``wandb`` extra). A run resumed in the same
    ``output_dir`` continues the same W&B run (its id is kept in ``output_dir/wandb_run_id``)."""
    wandb_entity: str | None = None
    """W&B team or user (null: the account's default entity)."""
    wandb_run_name: str | None = None
    """Display name of the W&B run (null: the name of ``output_dir``)."""
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    """``offline`` writes the run under ``output_dir/wandb`` for a later ``wandb sync``."""


@dataclass(kw_only=True)
class TrainConfig:
    iters: int = 10
    """Steps to train. 0 builds the model, loads ``checkpoint.load`` if set, saves it to
    ``checkpoint.dir`` and stops: a shared initial checkpoint, or a re-laid-out copy."""
    seed: int = 1234
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 128
    eval_interval: int = 0
    """Validation loss every N iterations on the mixture's valid split (0: never)."""
    eval_iters: int = 1
    """Global batches per validation (the same held-out samples every time)."""


@dataclass(kw_only=True)
class RunConfig:
    """A whole training run."""

    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
