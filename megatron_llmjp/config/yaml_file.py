"""Reading a YAML file for configuration: the mapping and where each dotted key is (file:line).

Shared by run configs (``loader.py``) and mixture files (``mixture_file.py``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from megatron_llmjp.config.errors import ConfigError

_Where = dict[str, str]  # dotted key -> "file:line" for messages


def _yaml_locations(text: str, path: str) -> _Where:
    """Map dotted keys of a YAML mapping to ``file:line`` so type errors can point at the line."""
    where: _Where = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                where[key] = f"{path}:{key_node.start_mark.line + 1}"
                walk(value_node, key + ".")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return where
    if root is not None:
        walk(root, "")
    return where


def load_yaml(path: str | Path) -> tuple[dict, _Where]:
    """Read a YAML mapping; return it with each dotted key's ``file:line``.

    Raises ``ConfigError`` if the file is missing, is not valid YAML (with the line) or is not
    a mapping at the top level."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    return data, _yaml_locations(text, str(p))
