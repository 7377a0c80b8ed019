"""The mixture file: its schema and checks (which sources, which stages, how much of each).

A mixture file is configuration, so it is parsed here, in ``config/``: validating a run config
that names one imports nothing above ``config/``. What a mixture means for the data (dataset
sizes, shares, the blend megatron-core samples) is ``data/mixture.py``; the file format is
documented there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_llmjp.config.errors import ConfigError
from megatron_llmjp.config.yaml_file import load_yaml


@dataclass(frozen=True)
class SourceMix:
    name: str
    weight: float | None = None
    multiplier: float | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    mix: tuple[SourceMix, ...]
    tokens: int | None = None


@dataclass(frozen=True)
class Mixture:
    path: str
    sources: dict[str, str]
    stages: dict[str, Stage]
    max_epochs: float = 4.0

    def stage(self, name: str | None) -> Stage:
        if name is None:
            if len(self.stages) == 1:
                return next(iter(self.stages.values()))
            raise ConfigError(
                f"{self.path} defines stages {sorted(self.stages)}: choose one with data.stage"
            )
        if name not in self.stages:
            raise ConfigError(
                f"data.stage={name!r} is not a stage of {self.path} (stages: "
                f"{', '.join(sorted(self.stages))})"
            )
        return self.stages[name]


def _number(value, where: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{where}: must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def load_mixture(path: str | Path) -> Mixture:
    """Parse and check a mixture file; every error names the file, line and key."""
    data, where = load_yaml(path)
    p = str(path)

    def at(key: str) -> str:
        return f"{where.get(key, p)}: {key}"

    unknown = set(data) - {"sources", "stages", "max_epochs"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{at(key)}: unknown key (expected sources, stages, max_epochs)")
    sources = data.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise ConfigError(f"{at('sources')}: expected a mapping of source name -> dataset prefix")
    for name, prefix in sources.items():
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError(f"{at(f'sources.{name}')}: expected a dataset path prefix")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError(f"{at('stages')}: expected a mapping of stage name -> stage")
    stages = {}
    for sname, body in stages_raw.items():
        key = f"stages.{sname}"
        if not isinstance(body, dict) or not isinstance(body.get("mix"), dict) or not body["mix"]:
            raise ConfigError(f"{at(key)}: expected a mapping with a non-empty 'mix'")
        extra = set(body) - {"mix", "tokens"}
        if extra:
            raise ConfigError(f"{at(f'{key}.{sorted(extra)[0]}')}: unknown key (mix, tokens)")
        tokens = body.get("tokens")
        if tokens is not None:
            tokens = int(_number(tokens, at(f"{key}.tokens")))
        mix = []
        for src, spec in body["mix"].items():
            skey = f"{key}.mix.{src}"
            if src not in sources:
                raise ConfigError(
                    f"{at(skey)}: unknown source (sources: {', '.join(sorted(sources))})"
                )
            if (
                not isinstance(spec, dict)
                or len(spec) != 1
                or not (set(spec) <= {"weight", "multiplier"})
            ):
                raise ConfigError(
                    f"{at(skey)}: expected exactly one of {{weight: W}} or {{multiplier: M}}"
                )
            ((kind, value),) = spec.items()
            value = _number(value, at(f"{skey}.{kind}"), positive=kind == "multiplier")
            mix.append(SourceMix(src, **{kind: value}))
        weights = sum(m.weight for m in mix if m.weight is not None)
        if weights > 1 + 1e-9:
            raise ConfigError(f"{at(f'{key}.mix')}: weights sum to {weights:g} > 1")
        if all(m.weight is not None for m in mix) and abs(weights - 1) > 1e-6:
            raise ConfigError(
                f"{at(f'{key}.mix')}: weights sum to {weights:g}; with no multiplier source "
                "they must sum to 1"
            )
        stages[sname] = Stage(str(sname), tuple(mix), tokens)
    max_epochs = _number(data.get("max_epochs", 4.0), at("max_epochs"))
    return Mixture(p, {str(k): v for k, v in sources.items()}, stages, max_epochs)
