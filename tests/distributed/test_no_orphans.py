"""A failed multi-rank run leaves no process behind and closes its output pipe.

The ranks are real ``llmjp-train`` processes writing to one shared pipe, as in
``llmjp-train ... | tail``. Rank 1 exits abruptly (``os._exit``) after two checkpoint saves,
so megatron-core's checkpoint results Manager exists on both ranks; rank 0 then fails on the
dead peer. Each rank starts its own session, so everything it started (and everything that was
re-parented to PID 1 after its death) is found by session id.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.helpers.spawn import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _session_members(sids: set[int]) -> list[str]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(p.pid) in sids:
                out.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:160]}")
        except (ProcessLookupError, PermissionError):
            pass
    return out


def test_crashed_run_leaves_no_processes_and_closes_the_pipe(tmp_path):
    args = ["--output-dir", str(tmp_path / "out")]
    for o in (
        "data.synthetic=true",
        "model.vocab_size=1000",
        "train.seq_length=32",
        "train.global_batch_size=4",
        "train.iters=20",
        "logging.tensorboard=false",
        "logging.gpu_telemetry=false",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        "checkpoint.interval=1",
    ):
        args += ["--set", o]
    read_end, write_end = os.pipe()
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "LLMJP_FAULT": "crash@3:1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "megatron_llmjp.cli.train", *args],
                cwd=REPO,
                env=env,
                stdout=write_end,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    os.close(write_end)
    chunks: list[bytes] = []
    eof = threading.Event()

    def drain() -> None:
        while data := os.read(read_end, 65536):
            chunks.append(data)
        eof.set()

    threading.Thread(target=drain, daemon=True).start()
    sids = {p.pid for p in procs}
    try:
        codes = [p.wait(timeout=180) for p in procs]
        log = b"".join(chunks).decode(errors="replace")
        assert codes == [4, 17], log
        assert "injected crash at step 3" in log
        # Both ranks saved (iterations 1 and 2): each had started the results Manager.
        assert (tmp_path / "ckpt" / "iter_0000002").is_dir(), log
        assert eof.wait(20), f"the output pipe is still open: {_session_members(sids)}"
        deadline = time.monotonic() + 10
        while _session_members(sids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session_members(sids) == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for member in _session_members(sids):
            os.kill(int(member.split(":")[0]), 9)
        if eof.is_set():
            os.close(read_end)
