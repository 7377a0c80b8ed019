"""Processes started on a rank's behalf end with the rank, on every exit path.

megatron-core starts a ``multiprocessing`` Manager at the first checkpoint save (the write
results queue of ``filesystem_async``). Its server process does not notice its parent's death:
after an abrupt exit of the rank (a crash, ``os._exit``, SIGKILL) it lived on under PID 1 with
the rank's stdout and stderr, so ``llmjp-train ... | tail`` never saw end-of-file. Here

- that Manager is started by ``install()``'s replacement, whose server process asks the kernel
  for SIGKILL when the rank dies (``PR_SET_PDEATHSIG``) and holds no log pipe (its stdio goes to
  ``/dev/null``);
- every process this rank forks from its main thread (megatron-core's asynchronous checkpoint
  writer and its workers) gets the same request for its own death, so none outlives an abrupt
  exit of the rank either;
- ``ChildProcesses.end()`` (the trainer's ``finally``) shuts that Manager down and ends every
  other process started during the run that is still alive (terminate, then kill).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1
_manager: SyncManager | None = None
_fork_hooks = False
_fork_parent: int | None = None
"""Set in the parent just before a fork from its main thread (None: from another thread)."""


def _request_death_signal(parent_pid: int) -> None:
    """``PR_SET_PDEATHSIG``: SIGKILL this process when ``parent_pid`` (its creator) exits."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _before_fork() -> None:
    global _fork_parent
    # The kernel signals when the forking *thread* ends: only main-thread forks qualify.
    main = threading.current_thread() is threading.main_thread()
    _fork_parent = os.getpid() if main else None


def _after_fork_in_child() -> None:
    if _fork_parent is not None:
        _request_death_signal(_fork_parent)


def die_with_parent(parent_pid: int) -> None:
    """In a child process: have the kernel SIGKILL it when ``parent_pid`` exits (Linux), and
    point its stdio at ``/dev/null`` so it never holds the parent's log pipe."""
    _request_death_signal(parent_pid)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _write_results_queue():
    """Stand-in for ``filesystem_async._get_write_results_queue``: the same lazily created
    Manager queue, from a server process that dies with this rank."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if fa._results_queue is None:
        _manager = SyncManager(ctx=mp.get_context("spawn"))
        _manager.start(die_with_parent, (os.getpid(),))
        fa._results_queue = _manager.Queue()
    return fa._results_queue


def install() -> None:
    """Route megatron-core's checkpoint results Manager through ``_write_results_queue``, and
    make every later main-thread fork of this process die with it."""
    global _fork_hooks
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    fa._get_write_results_queue = _write_results_queue
    if not _fork_hooks:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_hooks = True


def shutdown_results_manager() -> None:
    """Stop the checkpoint results Manager (a later save starts a new one)."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    fa._results_queue = None
    if _manager is not None:
        manager, _manager = _manager, None
        with contextlib.suppress(Exception):  # already gone: nothing to stop
            manager.shutdown()


def _is_resource_tracker(proc) -> bool:
    """multiprocessing's resource tracker ignores SIGTERM (terminating it would cost the whole
    timeout) and exits by itself when this process, the only writer of its pipe, exits; it
    also unlinks leaked semaphores on the way, which killing it would skip."""
    import psutil

    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


class ChildProcesses:
    """The descendants of this process that exist now; ``end()`` ends any started later."""

    def __init__(self) -> None:
        import psutil

        self._before = {p.pid for p in psutil.Process().children(recursive=True)}

    def end(self, timeout: float = 5.0) -> list[int]:
        """Stop the results Manager, then terminate (and after ``timeout`` s kill) every
        descendant started since construction; returns the pids that had to be ended."""
        import psutil

        shutdown_results_manager()
        try:
            new = [
                p
                for p in psutil.Process().children(recursive=True)
                if p.pid not in self._before and not _is_resource_tracker(p)
            ]
        except psutil.Error:
            return []
        for p in new:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(new, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=timeout)
        return [p.pid for p in new]
