"""The SingularityCE definition file cannot be built here (no singularity, no GPU), so its
structure is checked instead: header, sections, every version pinned once in %arguments and
matching setup.cfg and the README, and the install scripts are valid bash."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEF = REPO / "containers" / "llmjp.def"
README = REPO / "containers" / "README.md"
SECTIONS = ("arguments", "files", "post", "environment", "test", "labels", "help")
PINS = (
    "NGC_PYTORCH_TAG",
    "TRANSFORMER_ENGINE_VERSION",
    "APEX_COMMIT",
    "MEGATRON_CORE_VERSION",
    "MPI4PY_VERSION",
    "NVIDIA_ML_PY_VERSION",
)
# megatron-core 0.16.1's own tested Transformer Engine range (its "dev" extra).
TE_RANGE = ((2, 9), (2, 12))


def _parse(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(header keywords, section name -> body lines)."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^%(\w+)\s*$", line)
        if m:
            current = m[1]
            assert current not in sections, f"section %{current} appears twice"
            sections[current] = []
        elif current is None:
            if line.strip() and not line.startswith("#"):
                key, sep, value = line.partition(":")
                assert sep, f"header line without a keyword: {line!r}"
                header[key.strip()] = value.strip()
        else:
            sections[current].append(line)
    return header, sections


@pytest.fixture(scope="module")
def parsed():
    text = DEF.read_text()
    header, sections = _parse(text)
    args = {}
    for line in sections.get("arguments", []):
        if line.strip() and not line.strip().startswith("#"):
            key, _, value = line.strip().partition("=")
            args[key] = value
    return text, header, sections, args


def test_header_bootstraps_from_an_ngc_pytorch_image(parsed):
    _, header, _, args = parsed
    assert list(header)[:2] == ["Bootstrap", "From"]
    assert header["Bootstrap"] == "docker"
    assert header["From"] == "nvcr.io/nvidia/pytorch:{{ NGC_PYTORCH_TAG }}"
    assert re.fullmatch(r"\d\d\.\d\d-py3", args["NGC_PYTORCH_TAG"])


def test_sections_present(parsed):
    _, _, sections, _ = parsed
    assert set(SECTIONS) <= set(sections)
    assert all(any(line.strip() for line in sections[s]) for s in SECTIONS)


def test_versions_are_pinned_exactly_once(parsed):
    text, _, sections, args = parsed
    assert set(PINS) <= set(args)
    for key in PINS:
        assert args[key] and "latest" not in args[key].lower(), key
    for key in ("TRANSFORMER_ENGINE_VERSION", "MEGATRON_CORE_VERSION", "MPI4PY_VERSION"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", args[key]), key
    assert re.fullmatch(r"[0-9a-f]{40}", args["APEX_COMMIT"])
    outside = "\n".join(
        line for name, body in sections.items() if name != "arguments" for line in body
    )
    for key in PINS:
        # A pin written out again elsewhere would drift from %arguments.
        assert args[key] not in outside, f"{key}={args[key]} repeated outside %arguments"
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))
    assert used == set(args), (
        f"used but not defined: {used - set(args)}; unused: {set(args) - used}"
    )


def test_megatron_core_pin_matches_setup_cfg(parsed):
    _, _, _, args = parsed
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    requires = cfg["options"]["install_requires"].split()
    assert f"megatron-core=={args['MEGATRON_CORE_VERSION']}" in requires


def test_transformer_engine_in_megatron_cores_range(parsed):
    _, _, _, args = parsed
    version = tuple(int(x) for x in args["TRANSFORMER_ENGINE_VERSION"].split(".")[:2])
    assert TE_RANGE[0] <= version < TE_RANGE[1]


def test_post_installs_each_component(parsed):
    _, _, sections, _ = parsed
    post = "\n".join(sections["post"])
    for needle in (
        'transformer_engine[pytorch]=={{ TRANSFORMER_ENGINE_VERSION }}"',
        "git -C /tmp/apex checkout {{ APEX_COMMIT }}",
        "APEX_CPP_EXT=1 APEX_CUDA_EXT=1",
        '"megatron-core=={{ MEGATRON_CORE_VERSION }}"',
        '--no-binary mpi4py "mpi4py=={{ MPI4PY_VERSION }}"',
        "/opt/megatron-llmjp",
    ):
        assert needle in post, needle


def test_files_exist_in_the_repository(parsed):
    _, _, sections, _ = parsed
    for line in sections["files"]:
        if line.strip():
            src, dst = line.split()
            assert (REPO / src).exists(), src
            assert dst.startswith("/opt/megatron-llmjp/")


@pytest.mark.parametrize("section", ["post", "test"])
def test_scripts_are_valid_bash(parsed, section, tmp_path):
    _, _, sections, args = parsed
    body = "\n".join(sections[section])
    body = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: args[m[1]], body)
    script = tmp_path / f"{section}.sh"
    script.write_text(body + "\n")
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_readme_documents_every_pin(parsed):
    _, _, _, args = parsed
    readme = README.read_text()
    for key, value in args.items():
        assert f"`{key}={value}`" in readme, f"containers/README.md does not list {key}={value}"
    assert "singularity build --fakeroot llmjp.sif containers/llmjp.def" in readme
    assert "llmjp-launch --scheduler pbs" in readme
