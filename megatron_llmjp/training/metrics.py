"""Per-step scalars to ``metrics.jsonl`` (one JSON object per logged step), TensorBoard and,
when ``logging.wandb_project`` is set, Weights & Biases: the one place scalars are written."""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Any

WANDB_ID_FILE = "wandb_run_id"
"""In the run directory: the W&B run id, so a resumed run continues the same W&B run."""


def open_wandb(logging_cfg: Any, out_dir: str | Path, config: dict) -> Any:
    """Start (or resume) the W&B run of ``out_dir``; None when W&B is off.

    The run id is written to ``out_dir/wandb_run_id`` before the run starts, and read back by a
    later run in the same directory, which then continues that W&B run. ``config`` (the
    resolved run config) is recorded as the run's config."""
    if logging_cfg.wandb_project is None or logging_cfg.wandb_mode == "disabled":
        return None
    import wandb

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    id_file = out / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(6)  # W&B ids: lowercase letters and digits
        tmp = id_file.with_name(id_file.name + ".tmp")
        tmp.write_text(run_id + "\n")
        tmp.replace(id_file)
    return wandb.init(
        project=logging_cfg.wandb_project,
        entity=logging_cfg.wandb_entity,
        name=logging_cfg.wandb_run_name or out.resolve().name,
        mode=logging_cfg.wandb_mode,
        id=run_id,
        resume="allow",
        dir=str(out),
        config=config,
        allow_val_change=True,
        # The trainer's own stdout stays untouched (no console capture, no banners).
        settings=wandb.Settings(console="off", quiet=True, silent=True),
    )


class MetricsWriter:
    """Appends records to ``DIR/metrics.jsonl``; mirrors numeric fields to ``DIR/tensorboard``
    and to a W&B run (``wandb_run``, from ``open_wandb``) under the same ``train/`` names."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, wandb_run: Any = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        self._wandb = wandb_run
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def write(self, record: dict) -> None:
        """Write one step's record (``record["step"]`` is the step) to every sink."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        line = " ".join(
            f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
        )
        print(f"[llmjp] {line}", flush=True)
        scalars = {
            f"train/{key}": value
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self, exit_code: int = 0) -> None:
        """Close every sink; ``exit_code`` != 0 marks the W&B run as failed. Idempotent."""
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            run.finish(exit_code=exit_code)
            import wandb

            wandb.teardown()  # ends wandb's service process
