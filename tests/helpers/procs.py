"""Start the real ``llmjp-train`` entry point as N rank processes (no launcher in between).

Signals, crashes and exit codes are tested on the processes themselves, which is what a
scheduler sees; each rank writes its own log file so a failure shows every rank's output.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.spawn import free_port

REPO = Path(__file__).resolve().parents[2]


class Ranks:
    def __init__(self, world: int, args: list[str], log_dir: Path, env: dict | None = None):
        port = free_port()
        self.logs = [Path(log_dir) / f"rank{r}.log" for r in range(world)]
        self.procs = []
        for r in range(world):
            e = dict(os.environ)
            e.update(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1",
                **(env or {}),
            )
            with open(self.logs[r], "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "megatron_llmjp.cli.train", *args],
                        cwd=REPO,
                        env=e,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def all_logs(self) -> str:
        return "\n".join(f"--- rank {r} ---\n{self.log(r)}" for r in range(len(self.procs)))

    def wait_for(self, rank: int, text: str, timeout: float) -> None:
        """Block until ``text`` appears in a rank's log (fails if the rank exits first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(rank):
                return
            if self.procs[rank].poll() is not None:
                raise AssertionError(
                    f"rank {rank} exited ({self.procs[rank].returncode}) before printing "
                    f"{text!r}\n{self.all_logs()}"
                )
            time.sleep(0.2)
        raise AssertionError(
            f"{text!r} not in rank {rank}'s log after {timeout} s\n{self.all_logs()}"
        )

    def wait(self, timeout: float) -> list[int | None]:
        """Exit codes after at most ``timeout`` seconds (None for a rank still running)."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        return [p.poll() for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
