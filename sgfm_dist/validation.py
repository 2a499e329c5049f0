"""Checks shared by the config dataclasses (``model/config.py``, ``train/config.py``).

Every check raises :class:`ConfigError`, a ``ValueError`` whose message starts with the dotted
key of the offending field (``train.steps: must be a positive int, got 0``) and which carries
that key, so the YAML loader (``train/config_loader.py``) can name the file or ``--set`` item
the value came from. The dataclasses call these helpers from ``__post_init__``; the loader
checks nothing about values itself.

:func:`check_fields` is the type check of every field against its annotation (``int``,
``float``, ``bool``, ``str``, ``Literal``, ``X | None``, ``tuple``), normalising what YAML
gives (lists where tuples are meant, ints and ``"3e-4"`` strings where floats are meant), so a
config loaded from YAML equals one built in Python. Top level and standard library only:
``model/`` and ``train/`` both use it without ``model`` depending on ``train``.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from typing import Any, Iterable, Literal, Sequence

__all__ = [
    "ConfigError", "check", "check_fields", "field_types", "coerce", "choice", "non_empty_str",
    "positive", "non_negative", "positive_int", "non_negative_int", "in_range", "all_in_range",
    "positive_ints", "odd", "length", "multiple_of",
]


class ConfigError(ValueError):
    """A config value broke a rule; ``key`` is its dotted name (``"optim.betas"``)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def check(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``ok`` (for rules that tie fields together)."""
    if not ok:
        raise ConfigError(key, message)


# ----------------------------------------------------------------------------- types
@functools.cache
def field_types(cls) -> dict[str, Any]:
    """The resolved annotation of each ``__init__`` field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def check_fields(obj, section: str) -> None:
    """Check every field of dataclass ``obj`` against its annotation and store the normalised
    value (``section.name`` names it in errors). Sections (dataclass-typed fields) must be
    instances of their class; they check themselves."""
    for name, tp in field_types(type(obj)).items():
        key = f"{section}.{name}" if section else name
        value = getattr(obj, name)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            check(isinstance(value, tp), key, f"must be a {tp.__name__}, got {type(value).__name__}")
            continue
        normalised = coerce(key, value, tp)
        if normalised is not value:
            object.__setattr__(obj, name, normalised)


def coerce(key: str, value, tp):
    """``value`` checked against annotation ``tp`` and normalised (list -> tuple, int or a numeric
    string -> float, numpy integers -> int); a ``ConfigError`` naming ``key`` otherwise."""
    def fail(expected: str):
        raise ConfigError(key, f"must be {expected}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        return choice(key, value, args)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # X | None: X's own message (it names the bad item of a list)
            return coerce(key, value, arms[0])
        for a in arms:
            try:
                return coerce(key, value, a)
            except ConfigError:
                pass
        fail(" or ".join(_type_name(a) for a in args))
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            fail("an integer")
        return value if type(value) is int else int(value)
    if tp is float:
        # YAML 1.1 reads 3e-4 as a string (it wants 3.0e-4); accepted because everybody writes it.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            fail("a number")
        return value if type(value) is float else float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            fail(f"a list ({_type_name(tp)})")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(value) != len(args):
                fail(f"a list of {len(args)} items ({_type_name(tp)})")
            items = [coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else list(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        fail(f"a {tp.__name__}")
    return value


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


# ----------------------------------------------------------------------------- values
def choice(key: str, value, allowed: Iterable):
    """``value`` if it is one of ``allowed`` (bools never pass for ints), else a ConfigError
    listing them."""
    allowed = tuple(allowed)
    for a in allowed:
        same_kind = isinstance(value, bool) == isinstance(a, bool) and \
            (not isinstance(a, int) or isinstance(value, numbers.Integral))  # 1.0 and True are not 1
        if same_kind and value == a:
            return a
    raise ConfigError(key, f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def non_empty_str(key: str, value) -> None:
    check(isinstance(value, str) and bool(value), key, f"must be a non-empty string, got {value!r}")


def _number(key: str, value) -> None:
    check(not isinstance(value, bool) and isinstance(value, numbers.Real), key, f"must be a number, got {value!r}")


def positive(key: str, value) -> None:
    """A number > 0."""
    _number(key, value)
    check(value > 0, key, f"must be > 0, got {value}")


def non_negative(key: str, value) -> None:
    """A number >= 0."""
    _number(key, value)
    check(value >= 0, key, f"must be >= 0, got {value}")


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def positive_int(key: str, value) -> None:
    check(_is_int(value) and value >= 1, key, f"must be a positive int, got {value!r}")


def non_negative_int(key: str, value) -> None:
    check(_is_int(value) and value >= 0, key, f"must be an int >= 0, got {value!r}")


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _inside(v, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


def in_range(key: str, value, lo, hi, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """A number in the interval from ``lo`` to ``hi`` (closed unless ``*_open``)."""
    _number(key, value)
    check(_inside(value, lo, hi, lo_open, hi_open), key,
          f"must be in {_interval(lo, hi, lo_open, hi_open)}, got {value}")


def all_in_range(key: str, values: Sequence, lo, hi, *, lo_open: bool = False, hi_open: bool = False,
                 n: int | None = None) -> None:
    """A non-empty list of numbers in the interval (exactly ``n`` of them when given)."""
    count = f"{n} values" if n is not None else "values"
    ok = (len(values) == n if n is not None else len(values) > 0) and \
        all(not isinstance(v, bool) and isinstance(v, numbers.Real) and _inside(v, lo, hi, lo_open, hi_open)
            for v in values)
    check(ok, key, f"need {count} in {_interval(lo, hi, lo_open, hi_open)}, got {list(values)}")


def positive_ints(key: str, value) -> None:
    """One positive int or a non-empty list of them."""
    if isinstance(value, tuple):
        ok = bool(value) and all(_is_int(v) and v >= 1 for v in value)
    else:
        ok = _is_int(value) and value >= 1
    check(ok, key, f"must be a positive int or a list of positive ints, got {value!r}")


def odd(key: str, value, why: str = "") -> None:
    """An int, or every int of a tuple, odd."""
    values = value if isinstance(value, tuple) else (value,)
    check(all(v % 2 for v in values), key, f"must be odd{f' ({why})' if why else ''}, got {value}")


def length(key: str, values: Sequence, allowed: int | Iterable[int], why: str) -> None:
    """``len(values)`` is ``allowed`` (or one of them); ``why`` says what fixes the length."""
    allowed = (allowed,) if isinstance(allowed, int) else tuple(allowed)
    check(len(values) in allowed, key, f"has {len(values)} entries but {why}")


def multiple_of(key: str, value: int, k: int, why: str) -> None:
    """``value`` divisible by ``k``; ``why`` names the rule."""
    check(value % k == 0, key, f"{value} is not divisible by {why}")
