"""``megatron_llmjp.config`` is the bottom layer: importing it, and building and validating a
config (with or without a mixture file), pulls in nothing above it, and no module of it imports
one above it, not even inside a function."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import megatron_llmjp.config

REPO = Path(__file__).resolve().parents[2]


MIXTURE = REPO / "configs" / "mixtures" / "quickstart.yaml"


def test_config_imports_nothing_above_it():
    code = (
        "import json, sys\n"
        "import megatron_llmjp.config.errors, megatron_llmjp.config.schema\n"
        "import megatron_llmjp.config.presets, megatron_llmjp.config.loader\n"
        "import megatron_llmjp.config.validate\n"
        "megatron_llmjp.config.loader.build_config(overrides=['data.synthetic=true'])\n"
        "megatron_llmjp.config.loader.build_config(\n"
        f"    overrides=['data.mixture={MIXTURE}', 'data.stage=pretrain']\n"
        ")\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('megatron_llmjp'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    outside = [
        m for m in loaded if m != "megatron_llmjp" and not m.startswith("megatron_llmjp.config")
    ]
    assert outside == [], f"config/ imports modules above it: {outside}"


def test_config_error_is_one_class_everywhere():
    from megatron_llmjp.config import errors, loader
    from megatron_llmjp.data import mixture
    from megatron_llmjp.precision import recipes

    assert loader.ConfigError is errors.ConfigError
    assert mixture.ConfigError is errors.ConfigError
    assert recipes.ConfigError is errors.ConfigError


def test_no_config_module_imports_above_it_anywhere():
    """Static: every ``megatron_llmjp`` import in ``config/``, at any depth, stays in ``config``."""
    root = Path(megatron_llmjp.config.__file__).parent
    found = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("megatron_llmjp") and not name.startswith(
                    "megatron_llmjp.config"
                ):
                    found.append(f"{path.name}:{node.lineno}: {name}")
    assert found == [], f"config/ imports modules above it: {found}"
