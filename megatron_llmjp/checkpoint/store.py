"""Checkpoint directories on disk: naming, atomic publishing, the ``latest`` pointer.

A checkpoint root holds ``iter_NNNNNNN/`` directories and a ``latest`` text file with the
iteration of the newest complete one. Saves are written to ``iter_NNNNNNN.tmp/`` and renamed
only when every rank has finished; ``latest`` is replaced atomically afterwards. A crash at any
point therefore leaves the previous checkpoint and pointer untouched. Pure file-system code.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megatron_llmjp.config.loader import ConfigError

LATEST = "latest"
# Megatron-LM's pointer (``megatron/training/checkpointing.py``): an iteration number, or the
# word ``release`` for a ``release/`` directory.
MEGATRON_LM_LATEST = "latest_checkpointed_iteration.txt"
RELEASE = "release"
TMP_SUFFIX = ".tmp"
_ITER = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message names the path and what is wrong."""


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(path: Path) -> int | None:
    m = _ITER.match(path.name)
    return int(m.group(1)) if m else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_latest(root: Path) -> int | None:
    """Iteration named by ``root/latest``, or None when there is no such file."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not (text.isascii() and text.isdigit()):
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def read_megatron_lm_latest(root: Path) -> str | None:
    """The directory name Megatron-LM's ``latest_checkpointed_iteration.txt`` in ``root``
    designates (``iter_NNNNNNN`` or ``release``), or None when there is no such file."""
    path = Path(root) / MEGATRON_LM_LATEST
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if text == RELEASE:
        return RELEASE
    if not (text.isascii() and text.isdigit()):
        raise CheckpointError(
            f"{path}: expected an iteration number or {RELEASE!r}, found {text[:40]!r}"
        )
    return iter_name(int(text))


def resolve(path: str | Path, what: str) -> Path:
    """The checkpoint directory that ``path`` designates: a root's newest checkpoint (this
    package's ``latest`` or Megatron-LM's ``latest_checkpointed_iteration.txt``) or an
    ``iter_NNNNNNN`` / ``release`` directory itself.

    ``what`` names the config key or flag in error messages. Raises ``CheckpointError``."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what}: {p} does not exist (cwd: {Path.cwd()})")
    try:
        latest = read_latest(p)
        mlm = read_megatron_lm_latest(p) if latest is None else None
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e}") from e
    if latest is not None:
        target = p / iter_name(latest)
        swapped = target.with_name(target.name + ".old")
        if not target.is_dir() and swapped.is_dir():
            return swapped  # a re-save of this iteration was interrupted mid-swap
        if not target.is_dir():
            raise CheckpointError(
                f"{what}: {p / LATEST} names iteration {latest} but {target} is missing"
            )
        return target
    if mlm is not None:
        target = p / mlm
        if not target.is_dir():
            raise CheckpointError(
                f"{what}: {p / MEGATRON_LM_LATEST} names {mlm} but {target} is missing"
            )
        return target
    if p.is_dir() and (iteration_of(p) is not None or p.name == RELEASE):
        return p
    raise CheckpointError(
        f"{what}: {p} is neither a checkpoint root (no '{LATEST}' file, nor Megatron-LM's "
        f"'{MEGATRON_LM_LATEST}') nor an iter_NNNNNNN or release checkpoint directory"
    )


def has_checkpoint(root: str | Path) -> bool:
    return read_latest(Path(root)) is not None


def tmp_dir(root: Path, iteration: int) -> Path:
    return Path(root) / (iter_name(iteration) + TMP_SUFFIX)


def stale_tmp_dirs(root: Path) -> list[Path]:
    """Unpublished saves left by a crash (safe to delete: nothing points at them)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.endswith(TMP_SUFFIX) and _ITER.match(p.name[: -len(TMP_SUFFIX)])
    )


def publish(tmp: Path, root: Path, iteration: int) -> Path:
    """Rename a finished save into place, then point ``latest`` at it."""
    root = Path(root)
    final = root / iter_name(iteration)
    old = None
    if final.exists():  # re-saving an iteration (e.g. after a resume): swap, then drop the old
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, f"{iteration}\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def published(root: Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(iteration_of(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted((i, p) for i, p in out if i is not None)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete published checkpoints older than the newest ``keep_last`` (never ``latest``,
    never one Megatron-LM wrote into the same root)."""
    from megatron_llmjp.checkpoint.megatron_lm import is_megatron_lm

    latest = read_latest(root)
    items = [(i, p) for i, p in published(root) if not is_megatron_lm(p)]
    doomed = [p for i, p in items[: max(0, len(items) - keep_last)] if i != latest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def file_sizes(directory: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``directory`` (for the manifest)."""
    directory = Path(directory)
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@contextmanager
def staged_output(output: Path, force: bool) -> Iterator[Path]:
    """A temporary directory beside ``output`` (a converted or upcycled model), renamed to
    ``output`` when the block succeeds and removed when it fails: a reader never sees a
    half-written directory under the final name."""
    output = Path(output)
    if output.exists() and not force:
        raise CheckpointError(f"--output {output} already exists (pass --force to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.rename(output, old)
    os.rename(tmp, output)
    _fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
