"""``megatron_llmjp.config`` is the bottom layer: importing it, and building and validating a
config without a mixture, pulls in nothing above it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_config_imports_nothing_above_it():
    code = (
        "import json, sys\n"
        "import megatron_llmjp.config.errors, megatron_llmjp.config.schema\n"
        "import megatron_llmjp.config.presets, megatron_llmjp.config.loader\n"
        "import megatron_llmjp.config.validate\n"
        "megatron_llmjp.config.loader.build_config(overrides=['data.synthetic=true'])\n"
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
