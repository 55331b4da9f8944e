"""Typed run configuration: YAML presets and `--set key=value` overrides validated into one object.

The code defaults are the `tiny` preset (CPU, minutes); `configs/<name>.yaml` files hold only what
differs from them. Unknown keys and wrong types fail before anything starts, naming the file, the key
and what was expected (with a "did you mean" for typos). Validated configs are passed down as objects.

Light on purpose: imports neither torch nor Ray, so a typo fails in a second.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apr_ray.countdown.problems import ProblemConfig
from apr_ray.data import DemosConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, with the source and key in the message."""


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    problems: ProblemConfig = Field(default_factory=lambda: ProblemConfig(num_operands=3, num_max=30, target_max=30))
    train_problems: int = Field(2000, ge=1, description="problems in the train split")
    val_problems: int = Field(200, ge=1, description="problems in the validation split")
    test_problems: int = Field(200, ge=0, description="problems in the test split")
    demos: DemosConfig = Field(default_factory=DemosConfig)
    num_workers: int = Field(2, ge=1, le=1024, description="Ray Data parallelism for generation")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_problems, "val": self.val_problems, "test": self.test_problems}


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("tiny", description="preset / run name")
    seed: int = Field(0, description="seed of every random stream in the run")
    output_dir: Path = Field(Path("runs/tiny"), description="where data, checkpoints and exports go")
    data: DataConfig = Field(default_factory=DataConfig)


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model reached by following `loc` (for "did you mean" hints)."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        current = field.annotation
    return list(getattr(current, "model_fields", {}))


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            parent, leaf = e["loc"][:-1], str(e["loc"][-1])
            lines.append(f"{source}: unknown key '{key}'{_suggest(leaf, _fields_at(RunConfig, parent))}")
        else:
            got = e.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"{source}: {key}: {e['msg']}{got_text}")
    return "\n".join(lines)


def _set_path(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value`, the value read as YAML (so 3 is an int, true a bool, [1,2] a list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set data.train_problems=500")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {err}") from None


def resolve_source(config: str | Path | None) -> Path | None:
    """A preset name (`tiny`, `small`, ...) or a YAML path; None means the built-in defaults."""
    if config is None:
        return None
    path = Path(config)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = CONFIG_DIR / f"{config}.yaml"
    if not preset.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset '{config}'{_suggest(str(config), names)}; presets: {', '.join(names)}")
    return preset


def load_config(config: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a preset or YAML file, apply `key=value` overrides, validate. Raises ConfigError."""
    path = resolve_source(config)
    source = str(path) if path else "defaults"
    tree: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        tree = loaded or {}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(tree, key, value, f"--set {item}")
    if overrides:
        source += " + --set overrides"
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (logged with every run)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
