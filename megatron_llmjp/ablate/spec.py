"""The ablation file: a base run, a baseline and its variants, checked before any run starts.

```yaml
config: configs/abci3/llm-jp-4-8b_32node_bf16.yaml  # base run config (optional: defaults)
output_dir: runs/ablations/llm-jp-4-8b_fp8           # default runs/ablations/<file stem>
nproc: 8                  # processes of a local run (torchrun --nproc-per-node); default 1
overrides:                # --set for every run, the shared initial checkpoint included
  - train.iters=2000
  - logging.interval=1
baseline: bf16            # deltas are "variant minus baseline"
variants:                 # name -> the --set overrides of that variant (a list, may be empty)
  bf16: []
  fp8-delayed-hybrid: [precision.fp8=delayed, precision.fp8_format=hybrid]
divergence_threshold: 0.05    # see below
divergence_mode: absolute     # or relative
smoothing: 10                 # trailing moving-average window, in logged steps (1: raw loss)
variant_checkpoints: true     # each variant saves to its own checkpoint.dir (resumable)
```

Relative paths (``config``, ``output_dir``) are read from the current directory, like every
path in a run config.

**Divergence.** Each run's loss is smoothed with a trailing mean over ``smoothing`` logged
steps; at every step both runs logged, ``delta = smoothed(variant) - smoothed(baseline)``. A
variant diverges when ``|delta| > divergence_threshold`` at any such step (``absolute``: in
loss units; ``relative``: as a fraction of the baseline's smoothed loss), or when its loss
becomes non-finite or its run stopped on a non-finite step.

**Pairing.** Every run gets the same ``train.seed`` and data config, and starts from one
initial checkpoint (``train.iters=0`` of the base run). So a variant may not override
``model.*`` (the checkpoint's shapes), ``data.*``, ``train.seed``, ``train.iters``,
``train.global_batch_size`` or ``train.seq_length``; nothing may set ``output_dir``,
``checkpoint.dir``, ``checkpoint.load`` or ``checkpoint.load_optimizer``, which the harness
owns. Every variant's full config is built with the trainer's own loader (so ``--set`` keys,
types and cross-field rules are checked for real) before anything runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from megatron_llmjp.config.loader import ConfigError, build_config, load_yaml
from megatron_llmjp.config.schema import RunConfig

KEYS = (
    "config",
    "output_dir",
    "nproc",
    "overrides",
    "baseline",
    "variants",
    "divergence_threshold",
    "divergence_mode",
    "smoothing",
    "variant_checkpoints",
)
MODES = ("absolute", "relative")
HARNESS_KEYS = ("output_dir", "checkpoint.dir", "checkpoint.load", "checkpoint.load_optimizer")
"""Set by the harness for every run (where it writes, which checkpoint it starts from)."""
PAIRED_PREFIXES = ("model.", "data.")
PAIRED_KEYS = ("train.seed", "train.iters", "train.global_batch_size", "train.seq_length")
"""What every variant shares with the baseline: model shapes, data and its order, length."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class AblationSpec:
    path: Path
    config: str | None
    output_dir: str
    baseline: str
    variants: dict[str, tuple[str, ...]]
    """Name -> overrides, in file order (the baseline among them)."""
    overrides: tuple[str, ...] = ()
    nproc: int = 1
    divergence_threshold: float = 0.05
    divergence_mode: str = "absolute"
    smoothing: int = 10
    variant_checkpoints: bool = True
    where: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.path.stem

    def loc(self, key: str) -> str:
        """``file:line`` of ``key`` (dotted), else the file."""
        return self.where.get(key, str(self.path))


def _key_of(item: str) -> str:
    return item.split("=", 1)[0].strip()


def _check_items(items, key: str, where: dict[str, str], path: Path) -> tuple[str, ...]:
    loc = where.get(key, str(path))
    if items is None:
        return ()
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(
            f"{loc}: {key}: expected a list of 'section.key=value' strings, got {items!r}"
        )
    for item in items:
        if "=" not in item or not _key_of(item):
            raise ConfigError(f"{loc}: {key}: {item!r} is not 'section.key=value'")
        k = _key_of(item)
        if k in HARNESS_KEYS:
            raise ConfigError(
                f"{loc}: {key}: {k} is set by llmjp-ablate for every run (each run writes to "
                "OUTPUT/variants/NAME and starts from OUTPUT/init/checkpoints)"
            )
    return tuple(items)


def load_spec(path: str | Path) -> AblationSpec:
    """Read and check the ablation file's own fields (not yet the run configs: ``run_configs``)."""
    p = Path(path)
    data, where = load_yaml(p)

    def loc(key: str) -> str:
        return where.get(key, str(p))

    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(
            f"{loc(unknown[0])}: unknown ablation key {unknown[0]!r}; valid keys: {', '.join(KEYS)}"
        )
    config = data.get("config")
    if config is not None and not isinstance(config, str):
        raise ConfigError(f"{loc('config')}: config: expected a path, got {config!r}")
    output_dir = data.get("output_dir", f"runs/ablations/{p.stem}")
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"{loc('output_dir')}: output_dir: expected a path, got {output_dir!r}")
    nproc = data.get("nproc", 1)
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"{loc('nproc')}: nproc: expected an integer >= 1, got {nproc!r}")
    overrides = _check_items(data.get("overrides"), "overrides", where, p)

    variants_raw = data.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise ConfigError(
            f"{loc('variants')}: variants: expected a mapping of name -> list of overrides "
            "with at least two entries (the baseline and one variant)"
        )
    variants: dict[str, tuple[str, ...]] = {}
    for name, items in variants_raw.items():
        key = f"variants.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"{loc(key)}: variant name {name!r}: use letters, digits and _.+- (it names a "
                "directory and a job)"
            )
        variants[name] = _check_items(items, key, where, p)
        for item in variants[name]:
            k = _key_of(item)
            if k.startswith(PAIRED_PREFIXES) or k in PAIRED_KEYS:
                raise ConfigError(
                    f"{loc(key)}: {key}: {k} must be the same for every variant (they share "
                    "one initial checkpoint, seed and data order); put it under 'overrides'"
                )
    if len(variants) < 2:
        raise ConfigError(
            f"{loc('variants')}: variants: need the baseline and at least one other variant"
        )
    baseline = data.get("baseline")
    if baseline not in variants:
        raise ConfigError(
            f"{loc('baseline')}: baseline: {baseline!r} is not one of the variants "
            f"({', '.join(variants)})"
        )

    threshold = data.get("divergence_threshold", 0.05)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ConfigError(
            f"{loc('divergence_threshold')}: divergence_threshold: expected a number, got "
            f"{threshold!r}"
        )
    if not (math.isfinite(threshold) and threshold > 0):
        raise ConfigError(
            f"{loc('divergence_threshold')}: divergence_threshold: must be > 0, got {threshold}"
        )
    mode = data.get("divergence_mode", "absolute")
    if mode not in MODES:
        raise ConfigError(
            f"{loc('divergence_mode')}: divergence_mode: expected one of {', '.join(MODES)}, "
            f"got {mode!r}"
        )
    smoothing = data.get("smoothing", 10)
    if not isinstance(smoothing, int) or isinstance(smoothing, bool) or smoothing < 1:
        raise ConfigError(
            f"{loc('smoothing')}: smoothing: expected an integer >= 1 (logged steps), got "
            f"{smoothing!r}"
        )
    ckpts = data.get("variant_checkpoints", True)
    if not isinstance(ckpts, bool):
        raise ConfigError(
            f"{loc('variant_checkpoints')}: variant_checkpoints: expected true or false, got "
            f"{ckpts!r}"
        )
    return AblationSpec(
        path=p,
        config=config,
        output_dir=output_dir,
        baseline=baseline,
        variants=variants,
        overrides=overrides,
        nproc=nproc,
        divergence_threshold=float(threshold),
        divergence_mode=mode,
        smoothing=smoothing,
        variant_checkpoints=ckpts,
        where=where,
    )


def select(spec: AblationSpec, names: list[str] | None) -> list[str]:
    """The variants to run: ``names`` (checked) or all, in file order."""
    if not names:
        return list(spec.variants)
    unknown = [n for n in names if n not in spec.variants]
    if unknown:
        raise ConfigError(
            f"--variants: unknown variant {unknown[0]!r}; {spec.path} defines "
            f"{', '.join(spec.variants)}"
        )
    return [n for n in spec.variants if n in names]


@dataclass(frozen=True)
class RunPlan:
    """One run of the ablation: the init checkpoint (name ``None``) or a variant."""

    name: str | None
    output_dir: Path
    overrides: tuple[str, ...]
    cfg: RunConfig

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "init"


def init_overrides(common: tuple[str, ...], init_ckpt: Path) -> tuple[str, ...]:
    """The shared initial checkpoint: the base run built, seeded and saved at iteration 0
    (weights and RNG only; variants load the weights)."""
    return (
        *common,
        "train.iters=0",
        f"checkpoint.dir={init_ckpt}",
        "checkpoint.load=null",
    )


def variant_overrides(
    common: tuple[str, ...], own: tuple[str, ...], init_ckpt: Path, ckpt_dir: Path | None
) -> tuple[str, ...]:
    """A variant's weights come from the init checkpoint (no optimizer state); with its own
    ``checkpoint.dir`` an interrupted variant resumes from there instead."""
    return (
        *common,
        *own,
        f"checkpoint.load={init_ckpt}",
        "checkpoint.load_optimizer=false",
        f"checkpoint.dir={ckpt_dir if ckpt_dir is not None else 'null'}",
    )


def run_plans(
    spec: AblationSpec, root: Path, extra: tuple[str, ...] = (), world: int | None = None
) -> dict[str, RunPlan]:
    """Build and validate every run's config (``"init"`` first, then each variant by name);
    ``extra`` are command-line ``--set`` items for every run; ``world`` checks the layout."""
    from megatron_llmjp.parallel.layout import LayoutError, make_layout

    common = (*spec.overrides, *_check_items(list(extra), "--set", {}, Path("command line")))
    init_ckpt = root / "init" / "checkpoints"
    plans: dict[str, RunPlan] = {}
    todo: list[tuple[str | None, str, tuple[str, ...], Path]] = [
        (None, "overrides", init_overrides(common, init_ckpt), root / "init")
    ]
    for name, own in spec.variants.items():
        out = root / "variants" / name
        ckpt = out / "checkpoints" if spec.variant_checkpoints else None
        todo.append(
            (name, f"variants.{name}", variant_overrides(common, own, init_ckpt, ckpt), out)
        )
    for name, key, items, out in todo:
        try:
            cfg = build_config(spec.config, list(items), str(out))
            if world is not None:
                make_layout(cfg.parallel, cfg.model, cfg.train, world)
        except (ConfigError, LayoutError) as e:
            what = "the shared initial run" if name is None else f"variant {name!r}"
            raise ConfigError(f"{spec.loc(key)}: {what}: {e}") from None
        plans[name if name is not None else "init"] = RunPlan(name, out, items, cfg)
    base = plans[spec.baseline].cfg
    for name in spec.variants:
        cfg = plans[name].cfg
        if cfg.train.iters < 1:
            raise ConfigError(f"{spec.loc(f'variants.{name}')}: train.iters must be >= 1")
        if cfg.data != base.data or cfg.model != base.model:  # e.g. through the base config
            raise ConfigError(
                f"{spec.loc(f'variants.{name}')}: variant {name!r} has another model or data "
                f"config than the baseline {spec.baseline!r}"
            )
    return plans
