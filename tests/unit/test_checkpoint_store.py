"""Checkpoint files on disk, without process groups or models.

``checkpoint/store.py``: directory naming, ``atomic_write_text``, the ``latest`` pointer
(``read_latest``, ``has_checkpoint``, ``resolve`` and its error messages), unpublished saves
(``tmp_dir``, ``stale_tmp_dirs``), ``publish`` (including re-saving an iteration), ``published``,
``prune`` (never the checkpoint ``latest`` names) and ``file_sizes``.

``checkpoint/manifest.py``: the architecture section (``model_section``), ``build_manifest`` for a
MoE and a dense model, the ``write_manifest``/``read_manifest`` round trip and its rejections,
``verify_files`` (missing and truncated files) and ``check_model`` (shape fields that differ).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_llmjp.checkpoint import store
from megatron_llmjp.checkpoint.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    build_manifest,
    check_model,
    model_section,
    read_manifest,
    verify_files,
    write_manifest,
)
from megatron_llmjp.checkpoint.store import CheckpointError
from megatron_llmjp.config.loader import ConfigError, build_config
from megatron_llmjp.models.params import padded_vocab_size
from megatron_llmjp.parallel.layout import make_layout

PROGRESS = {"iteration": 3, "consumed_samples": 24, "skipped_steps": 0}

# -- helpers -------------------------------------------------------------------------------


def config(model: str, *overrides: str):
    return build_config(overrides=[f"model.name={model}", "data.synthetic=true", *overrides])


def manifest_for(model: str, *overrides: str, world: int = 1, files: dict | None = None) -> dict:
    cfg = config(model, *overrides)
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, world)
    layout_name = "sequential" if cfg.model.is_moe else "none"
    return build_manifest(
        cfg, layout, PROGRESS, files or {}, optimizer_saved=True, experts_layout=layout_name
    )


def make_tmp_save(root: Path, iteration: int, content: str = "shard") -> Path:
    """An unpublished save holding one file, as rank 0 leaves it before ``publish``."""
    tmp = store.tmp_dir(root, iteration)
    tmp.mkdir(parents=True)
    (tmp / "shard.bin").write_text(content)
    return tmp


def publish_all(root: Path, *iterations: int) -> None:
    for it in iterations:
        store.publish(make_tmp_save(root, it, f"it{it}"), root, it)


def names(paths) -> list[str]:
    return [p.name for p in paths]


# -- naming ----------------------------------------------------------------------------------


def test_checkpoint_error_is_a_config_error():
    assert issubclass(CheckpointError, ConfigError)


def test_iteration_directory_names_round_trip():
    assert store.iter_name(5) == "iter_0000005"
    assert store.iter_name(12345678) == "iter_12345678"
    assert store.iteration_of(Path("/x/iter_0000005")) == 5
    assert store.iteration_of(Path("iter_12345678")) == 12345678
    for bad in ("iter_5", "iter_0000005.tmp", "iter_0000005.old", "latest", "iter_abcdefg"):
        assert store.iteration_of(Path(bad)) is None, bad
    assert store.tmp_dir(Path("/ck"), 7) == Path("/ck/iter_0000007.tmp")


# -- atomic_write_text / read_latest ---------------------------------------------------------


def test_atomic_write_text_overwrites_and_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "latest"
    store.atomic_write_text(target, "1\n")
    assert target.read_text() == "1\n"
    store.atomic_write_text(target, "22\n")
    assert target.read_text() == "22\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_read_latest_and_has_checkpoint(tmp_path):
    assert store.read_latest(tmp_path) is None
    assert store.has_checkpoint(tmp_path) is False
    (tmp_path / "latest").write_text(" 42\n")
    assert store.read_latest(tmp_path) == 42
    assert store.has_checkpoint(tmp_path) is True


@pytest.mark.parametrize("text", ["", "abc", "-1", "5.0", "1 2"])
def test_read_latest_rejects_non_numbers(tmp_path, text):
    (tmp_path / "latest").write_text(text)
    with pytest.raises(CheckpointError, match="expected an iteration number") as e:
        store.read_latest(tmp_path)
    assert str(tmp_path / "latest") in str(e.value)


# -- resolve ---------------------------------------------------------------------------------


def test_resolve_root_gives_the_directory_latest_names(tmp_path):
    publish_all(tmp_path, 5, 10)
    assert store.resolve(tmp_path, "checkpoint.load") == tmp_path / "iter_0000010"
    assert store.resolve(str(tmp_path), "checkpoint.load") == tmp_path / "iter_0000010"


def test_resolve_iteration_directory_gives_itself(tmp_path):
    publish_all(tmp_path, 5, 10)
    older = tmp_path / "iter_0000005"
    assert store.resolve(older, "checkpoint.load") == older


def test_resolve_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as e:
        store.resolve(missing, "checkpoint.load")
    msg = str(e.value)
    assert msg.startswith("checkpoint.load: ")
    assert str(missing) in msg and "does not exist" in msg


def test_resolve_root_without_latest(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(CheckpointError) as e:
        store.resolve(tmp_path, "checkpoint.dir")
    msg = str(e.value)
    assert msg.startswith("checkpoint.dir: ")
    assert str(tmp_path) in msg
    assert "no 'latest' file" in msg and "iter_NNNNNNN" in msg


def test_resolve_latest_names_a_missing_iteration(tmp_path):
    publish_all(tmp_path, 5)
    (tmp_path / "latest").write_text("9\n")
    with pytest.raises(CheckpointError) as e:
        store.resolve(tmp_path, "checkpoint.load")
    msg = str(e.value)
    assert msg.startswith("checkpoint.load: ")
    assert "names iteration 9" in msg
    assert str(tmp_path / "iter_0000009") in msg and "missing" in msg


def test_resolve_latest_with_garbage(tmp_path):
    publish_all(tmp_path, 5)
    (tmp_path / "latest").write_text("not-a-number\n")
    with pytest.raises(CheckpointError) as e:
        store.resolve(tmp_path, "checkpoint.load")
    msg = str(e.value)
    assert str(tmp_path / "latest") in msg
    assert "expected an iteration number" in msg and "not-a-number" in msg


def test_resolve_latest_with_garbage_names_the_config_key(tmp_path):
    (tmp_path / "latest").write_text("not-a-number\n")
    with pytest.raises(CheckpointError, match="checkpoint.load"):
        store.resolve(tmp_path, "checkpoint.load")


# -- publish / published ---------------------------------------------------------------------


def test_publish_renames_the_save_and_points_latest_at_it(tmp_path):
    tmp = make_tmp_save(tmp_path, 5, "first")
    final = store.publish(tmp, tmp_path, 5)
    assert final == tmp_path / "iter_0000005"
    assert (final / "shard.bin").read_text() == "first"
    assert not tmp.exists()
    assert (tmp_path / "latest").read_text().strip() == "5"
    assert store.read_latest(tmp_path) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005", "latest"]


def test_publish_same_iteration_again_replaces_the_old_directory(tmp_path):
    store.publish(make_tmp_save(tmp_path, 5, "first"), tmp_path, 5)
    (tmp_path / "iter_0000005" / "only_in_old.bin").write_text("x")
    final = store.publish(make_tmp_save(tmp_path, 5, "second"), tmp_path, 5)
    assert (final / "shard.bin").read_text() == "second"
    assert not (final / "only_in_old.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005", "latest"]
    assert store.read_latest(tmp_path) == 5


def test_publish_removes_an_old_leftover_from_an_interrupted_resave(tmp_path):
    store.publish(make_tmp_save(tmp_path, 5, "first"), tmp_path, 5)
    (tmp_path / "iter_0000005.old").mkdir()
    store.publish(make_tmp_save(tmp_path, 5, "second"), tmp_path, 5)
    assert not (tmp_path / "iter_0000005.old").exists()
    assert (tmp_path / "iter_0000005" / "shard.bin").read_text() == "second"


def test_latest_follows_the_newest_publish(tmp_path):
    publish_all(tmp_path, 5, 10)
    assert store.read_latest(tmp_path) == 10
    publish_all(tmp_path, 15)
    assert store.read_latest(tmp_path) == 15
    assert [i for i, _ in store.published(tmp_path)] == [5, 10, 15]


def test_published_lists_only_iteration_directories_in_order(tmp_path):
    assert store.published(tmp_path / "missing") == []
    for name in ("iter_0000100", "iter_0000020", "iter_0000003.tmp", "iter_0000003.old", "logs"):
        (tmp_path / name).mkdir()
    (tmp_path / "iter_0000050").write_text("a file, not a checkpoint")
    assert store.published(tmp_path) == [
        (20, tmp_path / "iter_0000020"),
        (100, tmp_path / "iter_0000100"),
    ]


# -- stale_tmp_dirs / prune ------------------------------------------------------------------


def test_stale_tmp_dirs_finds_unpublished_saves_only(tmp_path):
    assert store.stale_tmp_dirs(tmp_path / "missing") == []
    publish_all(tmp_path, 5)
    make_tmp_save(tmp_path, 10)
    make_tmp_save(tmp_path, 7)
    (tmp_path / "iter_0000011.tmp").write_text("a file, not a directory")
    assert names(store.stale_tmp_dirs(tmp_path)) == ["iter_0000007.tmp", "iter_0000010.tmp"]


def test_stale_tmp_dirs_ignores_foreign_tmp_directories(tmp_path):
    make_tmp_save(tmp_path, 10)
    (tmp_path / "user_data.tmp").mkdir()
    assert names(store.stale_tmp_dirs(tmp_path)) == ["iter_0000010.tmp"]


def test_prune_deletes_the_oldest_published(tmp_path):
    publish_all(tmp_path, 1, 2, 3, 4)
    make_tmp_save(tmp_path, 5)
    doomed = store.prune(tmp_path, keep_last=2)
    assert names(doomed) == ["iter_0000001", "iter_0000002"]
    assert [i for i, _ in store.published(tmp_path)] == [3, 4]
    assert store.tmp_dir(tmp_path, 5).is_dir()  # unpublished saves are not prune's business
    assert store.read_latest(tmp_path) == 4


def test_prune_never_deletes_the_checkpoint_latest_names(tmp_path):
    publish_all(tmp_path, 1, 2, 3, 4)
    store.atomic_write_text(tmp_path / "latest", "1\n")  # e.g. rolled back to an older one
    doomed = store.prune(tmp_path, keep_last=2)
    assert names(doomed) == ["iter_0000002"]
    assert [i for i, _ in store.published(tmp_path)] == [1, 3, 4]
    assert store.resolve(tmp_path, "checkpoint.dir") == tmp_path / "iter_0000001"


def test_prune_with_fewer_checkpoints_than_keep_last_deletes_nothing(tmp_path):
    publish_all(tmp_path, 1, 2)
    assert store.prune(tmp_path, keep_last=3) == []
    assert [i for i, _ in store.published(tmp_path)] == [1, 2]


# -- file_sizes ------------------------------------------------------------------------------


def test_file_sizes_lists_every_file_recursively(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"12345")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"")
    (tmp_path / "sub" / "deeper").mkdir()
    assert store.file_sizes(tmp_path) == {"a.bin": 5, "sub/b.bin": 0}


# -- manifest: contents ----------------------------------------------------------------------


def test_moe_manifest_records_architecture_layout_and_versions():
    cfg = config("llm-jp-4-tiny-moe", "parallel.tp=2")
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, 2)
    man = build_manifest(
        cfg, layout, PROGRESS, {"a": 1}, optimizer_saved=True, experts_layout="sequential"
    )
    assert (man["format"], man["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert (man["iteration"], man["consumed_samples"], man["skipped_steps"]) == (3, 24, 0)
    assert man["files"] == {"a": 1}
    m = man["model"]
    assert m["name"] == "llm-jp-4-tiny-moe"
    assert m["family"] == "moe"
    assert m["hf_architecture"] == "Qwen3MoeForCausalLM"
    assert m["vocab_size"] == 196608
    assert m["padded_vocab_size"] == padded_vocab_size(196608, 128, 2)
    assert m["head_dim"] == cfg.model.kv_channels == 32
    assert m["qkv_layout"]["heads_per_group"] == 2  # 4 heads, 2 query groups
    moe = m["moe"]
    assert moe["num_experts"] == 8 and moe["router_topk"] == 2
    assert moe["experts_layout"] == "sequential"
    assert moe["router"]["norm_topk_prob"] is True
    assert moe["router"]["pre_softmax"] is False
    p = man["parallel"]
    assert (p["world"], p["tp"], p["etp"], p["dp"]) == (2, 2, 2, 1)
    assert p["sequence_parallel"] is True
    assert man["optimizer"]["saved"] is True
    assert man["versions"]["megatron_core"] == "0.16.1"
    assert man["versions"]["torch"]


def test_manifest_round_trips_through_write_and_read(tmp_path):
    man = manifest_for("llm-jp-4-tiny-moe", "parallel.tp=2", world=2, files={"a": 1})
    write_manifest(tmp_path, man)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]
    assert read_manifest(tmp_path) == man
    assert read_manifest(str(tmp_path)) == man


def test_dense_manifest_has_no_moe_section():
    m = manifest_for("llm-jp-4-8b")["model"]
    assert m["family"] == "dense"
    assert m["hf_architecture"] == "LlamaForCausalLM"
    assert m["moe"] is None
    assert (m["num_layers"], m["hidden_size"], m["ffn_hidden_size"]) == (32, 4096, 14336)
    assert m["qkv_layout"]["heads_per_group"] == 4  # 32 heads, 8 query groups


@pytest.mark.parametrize(("vocab", "tp", "padded"), [(1000, 1, 1024), (1000, 2, 1024)])
def test_manifest_pads_an_odd_vocabulary(vocab, tp, padded):
    man = manifest_for("llm-jp-4-8b", f"model.vocab_size={vocab}", f"parallel.tp={tp}", world=tp)
    assert man["model"]["vocab_size"] == vocab
    assert man["model"]["padded_vocab_size"] == padded
    assert man["model"]["make_vocab_size_divisible_by"] == 128


def test_model_section_padding_depends_on_tp():
    m = config("llm-jp-4-8b", "model.vocab_size=1100").model
    assert model_section(m, 1, "none")["padded_vocab_size"] == 1152  # multiple of 128
    assert model_section(m, 4, "none")["padded_vocab_size"] == 1536  # multiple of 512


# -- manifest: read_manifest rejections ------------------------------------------------------


def write_json(directory: Path, data) -> Path:
    path = directory / MANIFEST
    path.write_text(json.dumps(data))
    return path


def test_read_manifest_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        read_manifest(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and f"no {MANIFEST}" in msg


def test_read_manifest_invalid_json(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable") as e:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(e.value)


@pytest.mark.parametrize("data", [{"format": "something-else"}, ["not", "a", "dict"]])
def test_read_manifest_wrong_format(tmp_path, data):
    path = write_json(tmp_path, data)
    with pytest.raises(CheckpointError, match=f"not a {FORMAT} manifest") as e:
        read_manifest(tmp_path)
    assert str(path) in str(e.value)


def test_read_manifest_wrong_format_version(tmp_path):
    path = write_json(tmp_path, {**manifest_for("llm-jp-4-tiny-dense"), "format_version": 99})
    with pytest.raises(CheckpointError, match="format_version 99 is not supported") as e:
        read_manifest(tmp_path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("field", ["iteration", "model", "parallel", "files"])
def test_read_manifest_missing_required_field(tmp_path, field):
    man = manifest_for("llm-jp-4-tiny-dense")
    del man[field]
    path = write_json(tmp_path, man)
    with pytest.raises(CheckpointError, match=f"missing field '{field}'") as e:
        read_manifest(tmp_path)
    assert str(path) in str(e.value)


# -- manifest: verify_files ------------------------------------------------------------------


def saved_dir(directory: Path) -> dict:
    """A checkpoint directory with two files and a manifest that lists them."""
    (directory / "common.pt").write_bytes(b"x" * 10)
    (directory / "shards").mkdir()
    (directory / "shards" / "0.distcp").write_bytes(b"y" * 100)
    return {"files": store.file_sizes(directory)}


def test_verify_files_passes_when_sizes_match(tmp_path):
    man = saved_dir(tmp_path)
    assert man["files"] == {"common.pt": 10, "shards/0.distcp": 100}
    verify_files(tmp_path, man)  # no exception
    verify_files(str(tmp_path), man)


def test_verify_files_missing_file(tmp_path):
    man = saved_dir(tmp_path)
    (tmp_path / "shards" / "0.distcp").unlink()
    with pytest.raises(CheckpointError) as e:
        verify_files(tmp_path, man)
    msg = str(e.value)
    assert "shards/0.distcp" in msg and "missing" in msg and str(tmp_path) in msg


def test_verify_files_truncated_file(tmp_path):
    man = saved_dir(tmp_path)
    (tmp_path / "common.pt").write_bytes(b"x" * 4)
    with pytest.raises(CheckpointError) as e:
        verify_files(tmp_path, man)
    msg = str(e.value)
    assert "common.pt" in msg and "truncated" in msg
    assert "4 bytes" in msg and "records 10" in msg


# -- manifest: check_model -------------------------------------------------------------------


def test_check_model_accepts_the_same_model():
    man = manifest_for("llm-jp-4-tiny-dense")
    check_model(man, config("llm-jp-4-tiny-dense").model, "/ck/iter_0000003")
    moe = manifest_for("llm-jp-4-tiny-moe", "parallel.tp=2", world=2)
    check_model(moe, config("llm-jp-4-tiny-moe").model, "/ck/iter_0000003")  # tp is not shape


@pytest.mark.parametrize(
    ("override", "field", "saved", "current"),
    [("model.hidden_size=128", "hidden_size", 64, 128), ("model.num_layers=6", "num_layers", 4, 6)],
)
def test_check_model_names_the_differing_field(override, field, saved, current):
    man = manifest_for("llm-jp-4-tiny-dense")
    with pytest.raises(CheckpointError) as e:
        check_model(man, config("llm-jp-4-tiny-dense", override).model, "/ck/iter_0000003")
    msg = str(e.value)
    assert f"{field}: checkpoint {saved}, config {current}" in msg
    assert "/ck/iter_0000003" in msg and "llm-jp-4-tiny-dense" in msg


def test_check_model_dense_checkpoint_with_moe_config():
    man = manifest_for("llm-jp-4-tiny-dense")
    with pytest.raises(CheckpointError) as e:
        check_model(man, config("llm-jp-4-tiny-moe").model, "/ck/iter_0000003")
    msg = str(e.value)
    assert "family: checkpoint 'dense', config 'moe'" in msg
    assert "moe.num_experts: checkpoint None, config 8" in msg
    assert "(llm-jp-4-tiny-dense)" in msg and "(llm-jp-4-tiny-moe)" in msg


def test_check_model_moe_expert_count_differs():
    man = manifest_for("llm-jp-4-tiny-moe")
    with pytest.raises(CheckpointError, match="moe.num_experts: checkpoint 8, config 16"):
        check_model(man, config("llm-jp-4-tiny-moe", "model.num_experts=16").model, "/ck")


def test_resolve_uses_the_old_copy_when_a_resave_was_cut_mid_swap(tmp_path):
    """publish() renames iter_N to iter_N.old before moving the new save in; a crash between
    the two renames must not lose the checkpoint that ``latest`` names."""
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "iter_0000004.old").mkdir()
    (root / "latest").write_text("4\n")
    assert store.resolve(root, "checkpoint.dir") == root / "iter_0000004.old"


def test_read_latest_rejects_non_ascii_digits(tmp_path):
    (tmp_path / "latest").write_text("²")
    with pytest.raises(CheckpointError, match="expected an iteration number"):
        store.read_latest(tmp_path)
