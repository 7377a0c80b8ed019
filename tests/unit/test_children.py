"""Processes a rank forks die with it, even when the rank exits abruptly (``os._exit``)."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time

import psutil

SCRIPT = """
import multiprocessing as mp, os, time
from megatron_llmjp.training import children
children.install()
child = mp.get_context("fork").Process(target=time.sleep, args=(600,))
child.start()
print(child.pid, flush=True)
os._exit(3)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_forked_child_dies_with_an_abruptly_exiting_parent():
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    child = None
    try:
        line = proc.stdout.readline()
        child = int(line)
        assert proc.wait(timeout=60) == 3
        # End-of-file within seconds: nothing holds the pipe any more.
        readable, _, _ = select.select([proc.stdout], [], [], 10)
        assert readable and proc.stdout.read() == b"", "the child still holds the pipe"
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        if child is not None and _alive(child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, 9)
        proc.kill()
