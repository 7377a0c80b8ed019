"""The one progress helper: a tqdm bar on a terminal, plain lines (no carriage returns) in a
batch log, and the same helper behind preprocessing, conversion and upcycling."""

from __future__ import annotations

import io
from functools import partial

import pytest

from megatron_llmjp import progress
from megatron_llmjp.upcycle.driver import UpcycleSpec, upcycle
from tests.unit.test_upcycle import write_dense


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_redrawn_bar():
    out = _TTY()
    with progress.progress_bar(4, "[x]", stream=out, tty_every=0.0) as bar:
        for _ in range(4):
            bar.update(1)
    assert "\r[x]:  50%|" in out.getvalue() and "4/4" in out.getvalue()


def test_a_log_gets_plain_lines():
    out = io.StringIO()
    with progress.progress_bar(4, "[x]", stream=out, log_every=0.0) as bar:
        for _ in range(4):
            bar.set_postfix_str("1.00 GB", refresh=False)
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("[x]:   0.0% 0/4") and lines[1].startswith("[x]:  25.0% 1/4")
    assert lines[-1].startswith("[x]: 100.0% 4/4")
    assert lines[-1].endswith("1.00 GB")


def test_a_short_job_writes_nothing_to_a_log_and_disabled_writes_nothing():
    out = io.StringIO()
    with progress.progress_bar(4, "[x]", stream=out) as bar:  # log_every: 60 s
        bar.update(4)
    with progress.progress_bar(4, "[x]", stream=_TTY(), enabled=False) as bar:
        bar.update(4)
        assert bar.disable
    assert out.getvalue() == ""


@pytest.fixture
def logged(monkeypatch, capsys):
    """stderr as a batch log (captured, not a terminal) that gets every update."""
    fast = partial(progress.progress_bar, log_every=0.0)
    monkeypatch.setattr(progress, "progress_bar", fast)
    monkeypatch.setattr("megatron_llmjp.upcycle.driver.progress_bar", fast)
    return capsys


def test_conversion_progress_is_plain_lines_in_a_log(logged):
    from megatron_llmjp.convert.driver import _Progress

    bar = _Progress(2, "hf->mcore", True)
    bar.step(10**9, False)
    bar.step(0)
    bar.step(10**9)
    assert bar.bytes == 2 * 10**9
    text = logged.readouterr().err
    assert "\r" not in text
    last = text.splitlines()[-1]
    assert last.startswith("[convert] hf->mcore: 100.0% 2/2") and "2.00 GB" in last


def test_upcycling_progress_is_plain_lines_in_a_log(logged, tmp_path):
    write_dense(tmp_path / "dense")
    spec = UpcycleSpec(num_experts=4, topk=1, expert_ffn=192, drop_ratio=0.0, router_std=0.0)
    upcycle(tmp_path / "dense", tmp_path / "moe", spec, progress=True)
    text = logged.readouterr().err
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines()[-1].startswith("[upcycle]: 100.0%")
