"""YAML configs with typed defaults and `key=value` command-line overrides.

Every job takes one YAML file plus overrides such as `train.epochs=2 privacy.target_epsilon=inf`. The file is
validated by a pydantic model (unknown keys are errors), and all problems are reported at once in a
`KsgConfigError`, so a user fixes a config in one round trip instead of one error per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ksg_ray.common.errors import KsgError

__all__ = ["KsgConfigError", "StrictModel", "add_config_args", "apply_overrides", "describe_config", "job_config",
           "load_config", "parse_override", "run_config_show"]

T = TypeVar("T", bound=BaseModel)


class KsgConfigError(KsgError, ValueError):
    """A config is invalid; `problems` lists every problem found, each naming its key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid config {source}: {problems[0]}" if len(problems) == 1
                         else f"invalid config {source}:\n{lines}")


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are rejected and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], value); the value is parsed as YAML (`2`, `inf`, `[a, b]`)."""
    if "=" not in item:
        raise KsgConfigError("command line", [f"override {item!r} is not of the form key=value (e.g. train.epochs=2)"])
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise KsgConfigError("command line", [f"override {item!r} has an empty key"])
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, str) and value.lower() in {"inf", "+inf", "infinity"}:
        value = float("inf")
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key=value` override applied (nested keys are created as needed)."""
    out = _deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise KsgConfigError("command line", [f"override {item!r}: {part!r} is not a section"])
            node = child
        node[path[-1]] = value
    return out


def load_config(model: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `path` (YAML; None = defaults only), apply overrides, and validate into `model`.

    Raises:
        KsgConfigError: the file is missing or not YAML, or any field is invalid (all problems listed).
    """
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise KsgConfigError(source, [f"file not found: {p}"])
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise KsgConfigError(source, [f"not valid YAML: {e}"]) from e
        if loaded is not None and not isinstance(loaded, dict):
            raise KsgConfigError(source, ["top level must be a mapping of sections"])
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = [f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()]
        raise KsgConfigError(source, problems) from None


def job_config(model: type[T], argv: list[str] | None, description: str) -> T:
    """A recipe's command line: `[--config FILE] [key=value ...]`, validated into `model`."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config (defaults: the embedded default)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2")
    args = parser.parse_intermixed_args(argv)  # --config and overrides in any order
    cfg = load_config(model, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return cfg


def _deepcopy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in data.items()}


def describe_config(cfg: BaseModel, indent: int = 0) -> str:
    """The resolved config as YAML, each key with its field's description as a comment (`ksg config show`)."""
    lines = []
    pad = "  " * indent
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        key = field.alias or name
        note = f"  # {field.description}" if field.description else ""
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{key}:{note}")
            lines.append(describe_config(value, indent + 1))
        else:
            dumped = yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000).strip()
            dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{pad}{key}: {dumped}{note}")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def add_config_args(parser: Any, commands: list[str]) -> None:
    """Arguments of `ksg config show COMMAND [CONFIG] [key=value ...]`."""
    parser.add_argument("action", choices=["show"], help="show: print the resolved config with every default")
    parser.add_argument("stage", choices=commands, help="the command whose config to show")
    parser.add_argument("config", nargs="?", default=None, help="YAML config (none = the defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")


def run_config_show(args: Any, recipes: dict[str, str]) -> int:
    """Print the config `ksg <stage>` would run with; the stage's config class is its recipe's `CONFIG`."""
    import importlib

    model = importlib.import_module(recipes[args.stage]).CONFIG
    print(f"# {model.__doc__.strip().splitlines()[0] if model.__doc__ else model.__name__}")
    print(describe_config(load_config(model, args.config, list(args.overrides))))
    return 0
