"""Typed configs: dataclass helpers, TOML load/dump, validation and seeding.

Every stage owns a dataclass config at the top of its own file. The helpers here turn
a dict (from TOML, JSON or CLI flags) into that dataclass with errors that name the
field, and write the resolved config of a run as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; the message names the field (``ppo.kl_beta: must be >= 0``)."""


def field_doc(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field whose ``doc`` becomes the CLI help of the matching flag."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kw)
    return dataclasses.field(default=default, metadata={"doc": doc}, **kw)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        return {k: _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types name the field."""
    where = where or cls.__name__
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-able dict of a dataclass config (paths as strings)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {k: conv(v) for k, v in dataclasses.asdict(obj).items()}


# the tables a project TOML may hold (one file can carry them all): anything else is a typo
SECTIONS = ("build", "cost", "curve", "dpo", "gates", "ppo", "rm")


def _read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing file, a syntax error, a value outside any table or an
    unknown table (``[rmm]`` would silently leave every setting at its default) is a ConfigError."""
    if not Path(path).is_file():
        raise ConfigError(f"--config: no such file {path}")
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    known = ", ".join(f"[{s}]" for s in SECTIONS)
    for key, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key!r} is outside any table (put it under one of {known})")
        if key not in SECTIONS:
            raise ConfigError(f"{path}: unknown table [{key}] (preflab reads {known})")
    return data


def _known(section: str | None) -> None:
    # a reader of a table the file check does not know would refuse every file that has it
    if section is not None and section not in SECTIONS:
        raise AssertionError(f"config section {section!r} is not in config.SECTIONS")


def toml_table(path: str | Path, section: str) -> dict[str, Any]:
    """The ``[section]`` table of a project TOML as a dict ({} when the file has none)."""
    _known(section)
    return dict(_read_toml(path).get(section, {}))


def load_toml(cls: type[T], path: str | Path, section: str | None = None) -> T:
    """Load ``cls`` from a TOML file (optionally one ``[section]`` of it)."""
    _known(section)
    data = _read_toml(path)
    if section is not None:
        data = data.get(section, {})
    return from_dict(cls, data, where=f"{path}:{section or cls.__name__}")


def resolve(cls: type[T], path: str | Path | None, section: str, overrides: dict[str, Any]) -> T:
    """``cls`` from ``[section]`` of the TOML file ``path`` (if any), with CLI ``overrides`` (None = unset) on top."""
    _known(section)
    data: dict[str, Any] = dict(_read_toml(path).get(section, {})) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data, where=f"{path}:{section}" if path else section)


def write_config(obj: Any, run_dir: str | Path, name: str = "config.json") -> Path:
    """Write the resolved config of a run to ``run_dir/config.json``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / name
    out.write_text(json.dumps(to_dict(obj), indent=2, sort_keys=True) + "\n")
    return out


def check_resume(obj: Any, run_dir: str | Path, *, may_change: typing.Iterable[str] = (),
                 name: str = "config.json") -> None:
    """Before a run resumes: raise ``ConfigError`` naming the first field whose value differs from
    the one in ``run_dir/name`` (the run's own config), except ``may_change`` (fields that do not
    alter the trained weights, e.g. how often to checkpoint). A resumed run must end where the
    uninterrupted one would."""
    path = Path(run_dir) / name
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(to_dict(obj)))  # tuples -> lists, as they were written
    allowed = set(may_change)
    for k in sorted(new):
        if k not in allowed and old.get(k) != new[k]:
            raise ConfigError(f"{type(obj).__name__}.{k}: {new[k]!r} differs from {old.get(k)!r} in {path}; "
                              "resume with the run's own config or start a new run dir")


def check(cond: bool, where: str, message: str) -> None:
    """Raise ``ConfigError('where: message')`` unless ``cond`` holds (for ``validate``)."""
    if not cond:
        raise ConfigError(f"{where}: {message}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and (if imported/available) torch."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass
