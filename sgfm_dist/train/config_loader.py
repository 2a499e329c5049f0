"""YAML files -> a validated :class:`~sgfm_dist.train.config.Config`, and back to plain dicts.

Loading (``load_config``) goes YAML file -> its ``base:`` chain (paths relative to the file
that names them, recursive, cycles rejected) -> deep merge (child wins) -> ``--set``
overrides -> key check (an unknown key is a ValueError naming the file, the key and the
closest valid key) -> the dataclasses, whose ``__post_init__`` checks types against the
annotations (``Literal`` choices included) and values (``sgfm_dist.validation``). Every error
names where the offending value came from: the file or ``--set`` item that set its key.

The dataclasses (``train/config.py``, ``model/config.py``) know nothing of this module.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any

import yaml

from sgfm_dist.train.config import Config
from sgfm_dist.validation import ConfigError, field_types

__all__ = ["load_config", "config_from_dict", "config_to_dict", "parse_override"]


def load_config(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Config:
    """Read ``path`` (with its ``base:`` chain), apply ``--set`` style ``overrides``
    (``"a.b=value"``, value parsed as YAML), check keys and types, validate."""
    raw, origin = _read_with_bases(os.path.abspath(os.fspath(path)), stack=())
    for item in overrides:
        keys, value = parse_override(item)
        where = f"--set {item}"
        _check_keys(_nest(keys, value), Config, where, prefix="")
        _set_nested(raw, keys, value)
        origin[".".join(keys)] = where
    return config_from_dict(raw, origin=origin, default_source=os.fspath(path))


def config_from_dict(raw: dict, origin: dict[str, str] | None = None,
                     default_source: str = "<dict>") -> Config:
    """Build a validated :class:`Config` from a nested dict (e.g. a checkpoint's ``config``).

    ``origin`` maps dotted keys to where they were set, for error messages."""
    if not isinstance(raw, dict):
        raise ValueError(f"{default_source}: the config must be a mapping, got {type(raw).__name__}")
    _check_keys(raw, Config, default_source, prefix="")
    return _build(Config, raw, prefix="", origin=origin or {}, default_source=default_source)


def config_to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) that ``config_from_dict`` and YAML round-trip."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], "3e-4"); values are YAML (``[1, 2]``, ``true``,
    ``null``); YAML 1.1's string ``3e-4`` becomes a float where the field is one."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=3e-4")
    key, text = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ValueError(f"--set {item!r}: the key {key!r} has an empty part")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return keys, value


def _read_with_bases(path: str, stack: tuple[str, ...]) -> tuple[dict, dict[str, str]]:
    """The merged dict of ``path`` and its ``base:`` chain, plus each leaf key's source file."""
    if path in stack:
        chain = " -> ".join(stack + (path,))
        raise ValueError(f"{path}: 'base:' inheritance cycle: {chain}")
    if not os.path.isfile(path):
        where = f" (named by base: in {stack[-1]})" if stack else ""
        raise ValueError(f"config file {path} does not exist{where}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None)
    # Each file's keys are checked on their own, so an unknown key names the file it is in.
    _check_keys(data, Config, path, prefix="")
    merged: dict = {}
    origin: dict[str, str] = {}
    if bases is not None:
        for base in [bases] if isinstance(bases, str) else bases:
            if not isinstance(base, str):
                raise ValueError(f"{path}: 'base:' must be a path or a list of paths, got {base!r}")
            base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
            sub, sub_origin = _read_with_bases(base_path, stack + (path,))
            _merge(merged, sub)
            origin.update(sub_origin)
    _merge(merged, data)
    origin.update({k: path for k in _leaf_keys(data)})
    return merged, origin


def _merge(into: dict, new: dict) -> None:
    """Deep merge: mappings merge key by key, anything else is replaced."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.extend(_leaf_keys(v, key + ".") if isinstance(v, dict) else [key])
    return out


def _nest(keys: list[str], value) -> dict:
    d: Any = value
    for k in reversed(keys):
        d = {k: d}
    return d


def _set_nested(d: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def _check_keys(raw: dict, cls, where: str, prefix: str) -> None:
    """Unknown keys -> ValueError naming ``where``, the key and the closest valid key."""
    hints = field_types(cls)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            valid = [f"{prefix}{k}" for k in hints]
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.0)
            suggestion = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{where}: unknown config key '{dotted}'{suggestion} "
                             f"(valid keys here: {', '.join(valid)})")
        sub = _dataclass_in(hints[key])
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, where, prefix=dotted + ".")


def _build(cls, raw: dict, prefix: str, origin: dict[str, str], default_source: str):
    """``cls`` from the mapping ``raw`` (sections built recursively). The dataclass checks the
    values; a failed check is re-raised naming where its key was set."""
    kwargs = {}
    for name, tp in field_types(cls).items():
        if name not in raw:
            continue
        dotted = f"{prefix}{name}"
        sub = _dataclass_in(tp)
        if sub is not None:
            value = raw[name]
            if value is None:
                value = {}
            if not isinstance(value, dict):
                where = origin.get(dotted, default_source)
                raise ValueError(f"{where}: '{dotted}' is a section and needs a mapping, got {value!r}")
            kwargs[name] = _build(sub, value, dotted + ".", origin, default_source)
        else:
            kwargs[name] = raw[name]
    try:
        return cls(**kwargs)
    except ConfigError as e:
        key = e.key.split("[", 1)[0]  # optim.betas[1] was set as optim.betas
        where = origin[key] if key in origin else _sources(origin, prefix, default_source)
        raise ValueError(f"{where}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{_sources(origin, prefix, default_source)}: {e}") from None
    except TypeError as e:  # a section without defaults missing a required key
        raise ValueError(f"{default_source}: section '{prefix.rstrip('.') or 'config'}': {e}") from None


def _sources(origin: dict[str, str], prefix: str, default_source: str) -> str:
    """Every file / ``--set`` item that set a key under ``prefix``."""
    files = sorted({where for k, where in origin.items() if k.startswith(prefix)} or {default_source})
    return ", ".join(files)


def _dataclass_in(tp):
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None
