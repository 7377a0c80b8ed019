"""The ablation report: per-variant statistics against the baseline, a Markdown table, a JSON
summary and PNG plots (matplotlib's Agg canvas; no display needed).

Inputs are the runs' ``metrics.jsonl`` files. A run that resumed logs some steps twice; the
last record of a step wins. Deltas are taken at the steps both runs logged (``logging.interval``
1 gives every step). Throughput figures are medians over the logged steps after the first (the
first step includes warm-up); ``tflops_per_gpu`` and ``mfu`` are read when the records have them
and shown as ``n/a`` otherwise. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

NA = "n/a"


def read_metrics(path: str | Path) -> list[dict]:
    """Records of ``metrics.jsonl`` by step (last record of a step wins); a torn last line
    (a run killed mid-write) is ignored."""
    by_step: dict[int, dict] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start); non-finite values propagate."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


@dataclass(frozen=True)
class DivergenceRule:
    threshold: float = 0.05
    mode: str = "absolute"
    """``absolute``: |delta| in loss units; ``relative``: |delta| / baseline smoothed loss."""
    smoothing: int = 10

    def describe(self) -> str:
        unit = "" if self.mode == "absolute" else " of the baseline's smoothed loss"
        what = "smoothed loss" if self.smoothing > 1 else "loss"
        window = (
            f" (trailing mean over {self.smoothing} logged steps)" if self.smoothing > 1 else ""
        )
        return (
            f"a variant diverges when its {what}{window} differs from the baseline's by more "
            f"than {self.threshold:g}{unit} at any common step, or its loss is non-finite"
        )


@dataclass
class VariantRun:
    """One variant as the report sees it."""

    name: str
    records: list[dict]
    state: str = "done"
    """done, stopped (on a non-finite step), failed, interrupted, running, submitted, new."""
    overrides: tuple[str, ...] = ()
    iters: int | None = None

    @classmethod
    def from_dir(cls, name: str, run_dir: Path, **kw) -> VariantRun:
        return cls(name, read_metrics(Path(run_dir) / "metrics.jsonl"), **kw)


@dataclass
class VariantStats:
    name: str
    state: str
    steps: int = 0
    last_step: int | None = None
    final_loss: float | None = None
    final_delta: float | None = None
    mean_delta: float | None = None
    max_abs_delta: float | None = None
    """Largest |smoothed delta| (relative mode: as a fraction of the baseline's)."""
    diverged: bool | None = None
    diverged_at: int | None = None
    tokens_per_sec: float | None = None
    tflops_per_gpu: float | None = None
    mfu: float | None = None
    skipped_steps: int = 0
    overrides: list[str] = field(default_factory=list)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _median_after_first(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records[1:] if _finite(r.get(key))]
    if not values and records and _finite(records[0].get(key)):
        values = [records[0][key]]
    return float(statistics.median(values)) if values else None


def _loss(r: dict) -> float:
    v = r.get("loss")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def compute_stats(
    runs: list[VariantRun], baseline: str, rule: DivergenceRule
) -> list[VariantStats]:
    """Statistics of every run against ``baseline`` (which must be among ``runs``)."""
    base = next(r for r in runs if r.name == baseline)
    base_loss = {r["step"]: _loss(r) for r in base.records}
    base_smooth = dict(
        zip(base_loss, smooth(list(base_loss.values()), rule.smoothing), strict=True)
    )
    out = []
    for run in runs:
        recs = run.records
        st = VariantStats(run.name, run.state, overrides=list(run.overrides))
        st.steps = len(recs)
        st.skipped_steps = int(sum(r.get("skipped", 0) or 0 for r in recs))
        st.tokens_per_sec = _median_after_first(recs, "tokens_per_sec")
        st.tflops_per_gpu = _median_after_first(recs, "tflops_per_gpu")
        st.mfu = _median_after_first(recs, "mfu")
        if recs:
            st.last_step = recs[-1]["step"]
            st.final_loss = _loss(recs[-1])
        losses = {r["step"]: _loss(r) for r in recs}
        smoothed = dict(zip(losses, smooth(list(losses.values()), rule.smoothing), strict=True))
        nonfinite = [s for s, v in losses.items() if not math.isfinite(v)]
        common = [s for s in losses if s in base_loss]
        if run.name != baseline and common:
            deltas = [losses[s] - base_loss[s] for s in common]
            st.final_delta = deltas[-1]
            st.mean_delta = sum(deltas) / len(deltas)
            worst, first_over = 0.0, None
            for s in common:
                if not math.isfinite(base_smooth[s]):  # the baseline's own problem
                    continue
                d = abs(smoothed[s] - base_smooth[s])
                if rule.mode == "relative":
                    d = d / abs(base_smooth[s]) if base_smooth[s] else math.inf
                if math.isnan(d):  # a non-finite variant loss
                    d = math.inf
                worst = max(worst, d)
                if first_over is None and d > rule.threshold:
                    first_over = s
            st.max_abs_delta = worst
            st.diverged = first_over is not None
            st.diverged_at = first_over
        elif run.name == baseline and recs:
            st.diverged = False
        if nonfinite or run.state == "stopped":
            st.diverged = True
            at = [s for s in (st.diverged_at, nonfinite[0] if nonfinite else None) if s is not None]
            st.diverged_at = min(at) if at else st.last_step
        out.append(st)
    return out


# -- formatting -----------------------------------------------------------------------------


def _fmt(x: float | None, spec: str, signed: bool = False) -> str:
    if x is None:
        return NA
    if not math.isfinite(x):
        return str(x)
    return format(x, ("+" if signed else "") + spec)


def _yes_no(st: VariantStats) -> str:
    if st.diverged is None:
        return NA
    if st.diverged:
        return f"**yes** (step {st.diverged_at})" if st.diverged_at is not None else "**yes**"
    return "no"


def table(stats: list[VariantStats], baseline: str, rule: DivergenceRule) -> str:
    """The summary table in Markdown."""
    max_head = "max abs Δ" if rule.mode == "absolute" else "max rel Δ"
    head = [
        "variant",
        "state",
        "steps",
        "final loss",
        "Δ final",
        "mean Δ",
        f"{max_head} (smoothed)",
        "diverged",
        "tokens/s",
        "TFLOP/s/GPU",
        "MFU",
        "skipped steps",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for st in stats:
        is_base = st.name == baseline
        max_spec = ".4f" if rule.mode == "absolute" else ".2%"
        cells = [
            f"{st.name} (baseline)" if is_base else st.name,
            "pending" if st.state == "submitted" else st.state,
            str(st.steps),
            _fmt(st.final_loss, ".4f"),
            "-" if is_base else _fmt(st.final_delta, ".4f", signed=True),
            "-" if is_base else _fmt(st.mean_delta, ".4f", signed=True),
            "-" if is_base else _fmt(st.max_abs_delta, max_spec),
            _yes_no(st),
            _fmt(st.tokens_per_sec, ",.0f"),
            _fmt(st.tflops_per_gpu, ".1f" if (st.tflops_per_gpu or 0) >= 10 else ".3g"),
            _fmt(st.mfu, ".1%"),
            str(st.skipped_steps),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def markdown(
    title: str,
    stats: list[VariantStats],
    baseline: str,
    rule: DivergenceRule,
    notes: list[str],
    plots: bool = True,
) -> str:
    lines = [
        f"# Ablation: {title}",
        "",
        f"Baseline: `{baseline}`. Δ = variant - baseline loss at "
        "the steps both logged; Δ final at the last such step, mean Δ over them.",
        "",
    ]
    lines += [f"Divergence: {rule.describe()}.", "", table(stats, baseline, rule)]
    lines += ["Overrides per variant:", ""]
    for st in stats:
        items = " ".join(f"`{o}`" for o in st.overrides) or "(none)"
        lines.append(f"- `{st.name}`: {items}")
    lines += [""] + [f"{n}" for n in notes] + ([""] if notes else [])
    if plots:
        lines += [
            "![loss](loss.png)",
            "",
            "![loss delta](loss_delta.png)",
            "",
            "![grad norm](grad_norm.png)",
            "",
        ]
    else:
        lines += [
            "No plots: matplotlib is not installed (`pip install megatron-llmjp[ablate]`).",
            "",
        ]
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


# -- files ----------------------------------------------------------------------------------


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plot(path: Path, title: str, ylabel: str, series: dict, *, logy=False, hlines=()) -> None:
    """One line plot, written atomically. ``series``: label -> (steps, values)."""
    if not _have_matplotlib():
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        ys = [y if math.isfinite(y) else math.nan for y in ys]
        ax.plot(xs, ys, label=label, linewidth=1.2)
    for y in hlines:
        ax.axhline(y, color="grey", linestyle="--", linewidth=0.8)
    if logy and any(v > 0 for _, ys in series.values() for v in ys if math.isfinite(v)):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def write_report(
    out_dir: str | Path,
    runs: list[VariantRun],
    baseline: str,
    rule: DivergenceRule,
    title: str = "ablation",
    notes: list[str] | None = None,
) -> list[VariantStats]:
    """Write ``report.md``, ``summary.json``, ``loss.png``, ``loss_delta.png`` and
    ``grad_norm.png`` to ``out_dir``; returns the statistics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = compute_stats(runs, baseline, rule)
    summary = {
        "title": title,
        "baseline": baseline,
        "divergence": {
            "threshold": rule.threshold,
            "mode": rule.mode,
            "smoothing": rule.smoothing,
            "rule": rule.describe(),
        },
        "variants": {st.name: {k: v for k, v in vars(st).items() if k != "name"} for st in stats},
    }
    _atomic_text(out / "summary.json", json.dumps(_jsonable(summary), indent=2) + "\n")

    def curve(run: VariantRun, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], float(r[key])) for r in run.records if _finite(r.get(key))]
        return [p[0] for p in pts], [p[1] for p in pts]

    loss = {r.name: ([x["step"] for x in r.records], [_loss(x) for x in r.records]) for r in runs}
    _plot(out / "loss.png", "training loss", "loss", {k: v for k, v in loss.items() if v[0]})
    base = loss[baseline]
    base_s = dict(zip(base[0], smooth(base[1], rule.smoothing), strict=True))
    deltas = {}
    for r in runs:
        if r.name == baseline:
            continue
        steps, vals = loss[r.name]
        sm = dict(zip(steps, smooth(vals, rule.smoothing), strict=True))
        common = [s for s in steps if s in base_s]
        if common:
            deltas[r.name] = (common, [sm[s] - base_s[s] for s in common])
    lim = (rule.threshold, -rule.threshold) if rule.mode == "absolute" else ()
    sm_note = f", trailing mean over {rule.smoothing} steps" if rule.smoothing > 1 else ""
    _plot(
        out / "loss_delta.png",
        f"loss - baseline ({baseline}){sm_note}",
        "Δ loss",
        deltas,
        hlines=(0.0, *lim),
    )
    grads = {r.name: curve(r, "grad_norm") for r in runs}
    _plot(
        out / "grad_norm.png",
        "gradient norm",
        "grad norm",
        {k: v for k, v in grads.items() if v[0]},
        logy=True,
    )
    md = markdown(title, stats, baseline, rule, notes or [], plots=_have_matplotlib())
    _atomic_text(out / "report.md", md)
    return stats
