"""Mixture files: parsing errors with file:line, shares from weights and multipliers, plans."""

from __future__ import annotations

import pytest

from megatron_llmjp.config.loader import ConfigError
from megatron_llmjp.config.mixture_file import load_mixture
from megatron_llmjp.data.mixture import plan_stage, shares

GOOD = """\
sources:
  ja: data/ja
  en: data/en
  code: data/code
max_epochs: 3
stages:
  pretrain:
    tokens: 1000
    mix:
      ja: {multiplier: 4.5}
      en: {multiplier: 1}
      code: {weight: 0.1}
  midtrain:
    mix:
      ja: {weight: 0.5}
      en: {weight: 0.5}
"""


def _load(tmp_path, text):
    p = tmp_path / "mix.yaml"
    p.write_text(text)
    return load_mixture(p)


def test_good_file_parses(tmp_path):
    m = _load(tmp_path, GOOD)
    assert set(m.stages) == {"pretrain", "midtrain"} and m.max_epochs == 3
    pre = m.stage("pretrain")
    assert pre.tokens == 1000 and [s.name for s in pre.mix] == ["ja", "en", "code"]
    with pytest.raises(ConfigError, match="choose one with data.stage"):
        m.stage(None)
    with pytest.raises(ConfigError, match="data.stage='post' is not a stage"):
        m.stage("post")


def test_multipliers_scale_natural_shares_and_weights_are_fixed(tmp_path):
    pre = _load(tmp_path, GOOD).stage("pretrain")
    natural = {"ja": 100, "en": 900, "code": 500}
    got = shares(pre, natural)
    assert got["code"] == pytest.approx(0.1)
    # The other 90% split in proportion to multiplier x natural tokens: 450 : 900.
    assert got["ja"] == pytest.approx(0.9 * 450 / 1350)
    assert got["en"] == pytest.approx(0.9 * 900 / 1350)
    assert sum(got.values()) == pytest.approx(1.0)


def test_multipliers_of_one_keep_natural_shares(tmp_path):
    m = _load(tmp_path, GOOD.replace("{multiplier: 4.5}", "{multiplier: 1}"))
    stage = m.stage("pretrain")
    got = shares(stage, {"ja": 300, "en": 600, "code": 1})
    assert got["ja"] / got["en"] == pytest.approx(0.5)


def test_plan_reports_epochs_and_warns_on_repetition(tmp_path):
    m = _load(tmp_path, GOOD)
    plan = plan_stage(m, m.stage("pretrain"), natural={"ja": 100, "en": 900, "code": 500})
    rows = {r.source: r for r in plan.rows}
    assert plan.budget == 1000 and plan.budget_from == "stages.pretrain.tokens"
    assert rows["ja"].sampled_tokens == 300 and rows["ja"].epochs == pytest.approx(3.0)
    assert sum(r.sampled_tokens for r in plan.rows) == 1000
    assert plan.warnings == []
    big = plan_stage(m, m.stage("pretrain"), 2000, {"ja": 100, "en": 900, "code": 500}, "run")
    assert big.budget_from == "run"
    assert any("source ja would be repeated 6.0 times (> max_epochs=3)" in w for w in big.warnings)
    natural = plan_stage(m, m.stage("midtrain"), natural={"ja": 100, "en": 900})
    assert natural.budget == 1000 and "natural total" in natural.budget_from


BAD = [
    ("ja: {multiplier: 4.5}", "ja: {multiplier: 4.5, weight: 0.2}", "exactly one of"),
    ("ja: {multiplier: 4.5}", "jp: {multiplier: 4.5}", "stages.pretrain.mix.jp: unknown source"),
    ("ja: {multiplier: 4.5}", "ja: {multiplier: -1}", "multiplier: must be > 0"),
    ("ja: {weight: 0.5}", "ja: {weight: 0.7}", "weights sum to 1.2 > 1"),
    ("ja: {weight: 0.5}\n      en: {weight: 0.5}", "ja: {weight: 0.5}", "must sum to 1"),
    ("    tokens: 1000", "    tokenz: 1000", "stages.pretrain.tokenz: unknown key"),
    ("max_epochs: 3", "max_epochs: three", "max_epochs: expected a number"),
]


@pytest.mark.parametrize("old,new,fragment", BAD, ids=[b[2] for b in BAD])
def test_bad_mixture_names_file_line_and_key(tmp_path, old, new, fragment):
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    msg = str(e.value)
    assert fragment in msg and str(tmp_path / "mix.yaml") + ":" in msg
