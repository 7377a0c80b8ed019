"""Build a ``RunConfig`` from YAML and ``--set`` overrides, with errors that name the field.

Errors are ``ConfigError``: one line that names the file, the line (for YAML), the dotted
field and what was expected. Entry points print it and exit 2, without a traceback.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from megatron_llmjp.config.errors import ConfigError
from megatron_llmjp.config.presets import MODELS
from megatron_llmjp.config.schema import ModelConfig, RunConfig
from megatron_llmjp.config.validate import SECTIONS, validate_static
from megatron_llmjp.config.yaml_file import _Where, load_yaml

__all__ = [
    "ConfigError",
    "build_config",
    "build_dataclass",
    "dump_yaml",
    "load_yaml",
    "parse_overrides",
    "to_dict",
]


def parse_overrides(items: list[str]) -> dict:
    """``["train.iters=5", "parallel.tp=2"]`` -> nested dict. Values are parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.iters=20")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is a value, not a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: _Where) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only lossless cases (int->float,
    '3e-4'->float, which YAML 1.1 reads as a string)."""
    loc = f"{where[key]}: " if key in where else ""
    fail = ConfigError(f"{loc}{key}: expected {_type_name(tp)}, got {value!r}")
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass
        raise fail
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise fail
    if origin is list:
        if not isinstance(value, list):
            raise fail
        return [_coerce(v, get_args(tp)[0], key, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise fail from None
        raise fail
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail
    raise fail


def build_dataclass(cls: type, data: dict, prefix: str, where: _Where, base: Any = None) -> Any:
    """Type-checked ``cls(**data)`` (or ``replace(base, **data)``); ``prefix`` and ``where``
    only shape error messages (dotted key, ``file:line``)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        loc = f"{where[key]}: " if key in where else ""
        raise ConfigError(
            f"{loc}unknown config key {key!r}; valid keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            if value is None:  # an empty section in YAML
                value = {}
            if not isinstance(value, dict):
                loc = f"{where[key]}: " if key in where else ""
                raise ConfigError(f"{loc}{key}: expected a section (mapping), got {value!r}")
            kwargs[name] = _build_section(tp, value, key + ".", where)
        else:
            kwargs[name] = _coerce(value, tp, key, where)
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def _build_section(tp: type, data: dict, prefix: str, where: _Where) -> Any:
    if tp is ModelConfig:
        name = data.get("name", ModelConfig().name)
        if name not in MODELS:
            key = prefix + "name"
            loc = f"{where[key]}: " if key in where else ""
            raise ConfigError(
                f"{loc}model.name: unknown model {name!r}; known: {', '.join(sorted(MODELS))}"
            )
        return build_dataclass(tp, data, prefix, where, base=MODELS[name])
    return build_dataclass(tp, data, prefix, where)


def build_config(
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    output_dir: str | None = None,
    uses: Collection[str] | None = None,
) -> RunConfig:
    """Defaults < YAML file < ``--set`` overrides < ``--output-dir``; then validated: the
    sections ``uses`` names (default: all; see ``validate.validate_static``)."""
    data: dict = {}
    where: _Where = {}
    if config_file is not None:
        data, where = load_yaml(config_file)
    if overrides:
        parsed = parse_overrides(overrides)
        data = _merge(data, parsed)
        where.update(dict.fromkeys(_flatten(parsed), "--set"))
    if output_dir is not None:
        data["output_dir"] = output_dir
    data.setdefault("model", {})
    cfg = build_dataclass(RunConfig, data, "", where)
    cfg.checkpoint.dir = checkpoint_dir(cfg.output_dir, cfg.checkpoint.dir)
    validate_static(cfg, SECTIONS if uses is None else uses)
    return cfg


def checkpoint_dir(output_dir: str, directory: str | None) -> str | None:
    """``checkpoint.dir`` as used: a relative one lies in the run directory (``output_dir``),
    so ``--output-dir`` moves the checkpoints with the run; an absolute one is kept. The
    result is absolute, so a run's saved ``config.yaml`` resumes the same checkpoints."""
    if directory is None:
        return None
    d = Path(directory).expanduser()
    if d.is_absolute():
        return str(d)
    return str((Path(output_dir).expanduser() / d).resolve())


def _flatten(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys += _flatten(v, prefix + k + ".")
    return keys


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (atomically: temporary name, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
    tmp.replace(p)
