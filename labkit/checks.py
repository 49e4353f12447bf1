"""Checks for the config dataclasses' `__post_init__`: a bad value fails at construction, before any model loads
or state changes, with a message naming the class, the field, the value and what is allowed, e.g.

    PPOConfig.lr = nan: must be a finite number > 0.
    PPOConfig.whiten_rewards = 'false' (str): must be true or false (a YAML bool, not a string).

`check_types` checks every field against its annotation; the range helpers then check values. Float fields
are only checked for finiteness by the range helpers (`above`, `at_least`, `in_range`, `finite`), so that the
message states the whole rule: give every float field one of them. Every error is a ValueError. Stdlib only.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing


def fail(obj, name: str, rule: str, show_type: bool = False) -> typing.NoReturn:
    """Raise ValueError("Cls.name = value: rule")."""
    value = getattr(obj, name)
    shown = f"{value!r} ({type(value).__name__})" if show_type else repr(value)
    raise ValueError(f"{type(obj).__name__}.{name} = {shown}: {rule}")


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # also works on frozen dataclasses (Task, TruncationRule)


def check_types(obj) -> None:
    """Check each init field of a dataclass instance against its annotation: bool, int, float, str, dict,
    list[str], a dataclass, or `X | None`. Integral floats (4.0, YAML's 1e4) become ints in int fields, ints
    become floats in float fields, tuples become lists in list fields."""
    hints = typing.get_type_hints(type(obj))  # resolves `from __future__ import annotations` strings
    for f in dataclasses.fields(obj):
        if f.init:
            _check_type(obj, f.name, hints[f.name])


def _check_type(obj, name: str, hint) -> None:
    value, optional = getattr(obj, name), ""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # only `X | None` is used
        if value is None:
            return
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = " or None (null in YAML)"
    origin = typing.get_origin(hint) or hint
    if hint is bool:
        if not isinstance(value, bool):  # 'false' is truthy and 0/1 may be a typo for another field
            kind = "a YAML bool, not a string" if isinstance(value, str) else "a bool"
            fail(obj, name, f"must be true or false ({kind}){optional}.", show_type=True)
    elif hint is int:  # numbers.Integral: also numpy's ints
        integral = isinstance(value, float) and math.isfinite(value) and value.is_integer()
        if isinstance(value, bool) or not (integral or isinstance(value, numbers.Integral)):
            fail(obj, name, f"must be a whole number (int){optional}{_quoted(value)}.", show_type=True)
        _set(obj, name, int(value))
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            fail(obj, name, f"must be a number{optional}{_quoted(value)}.", show_type=True)
        _set(obj, name, float(value))
    elif hint is str:
        if not isinstance(value, str):
            fail(obj, name, f"must be a string{optional}.", show_type=True)
    elif origin is dict:
        if not isinstance(value, dict):
            fail(obj, name, f"must be a mapping (key: value){optional}.", show_type=True)
    elif origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, item) for v in value):
            fail(obj, name, f"must be a list of {item.__name__} values, e.g. [a, b]{optional}.", show_type=True)
        _set(obj, name, list(value))
    elif dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            fail(obj, name, f"must be a {hint.__name__}{optional}.", show_type=True)
    else:
        raise TypeError(f"labkit.checks cannot check {type(obj).__name__}.{name}: annotation {hint!r}.")


def _quoted(value) -> str:
    """A hint for a number written as a string, e.g. '1e-5' in quotes."""
    if isinstance(value, str):
        try:
            float(value)
            return "; this one is a string: write the number without quotes"
        except ValueError:
            pass
    return ""


def _noun(value) -> str:
    return "a whole number" if isinstance(value, int) else "a finite number"


def _ok(value, test) -> bool:
    return (isinstance(value, int) or math.isfinite(value)) and test(value)


def _end(why: str) -> str:
    return f" ({why})." if why else "."


def finite(obj, name: str, why: str = "") -> None:
    """A float field with no range: refuse NaN and infinities. None passes (the type check handled it)."""
    value = getattr(obj, name)
    if value is not None and not math.isfinite(value):
        fail(obj, name, "must be a finite number" + _end(why))


def above(obj, name: str, lo, why: str = "") -> None:
    """value > lo (and finite); None passes."""
    value = getattr(obj, name)
    if value is not None and not _ok(value, lambda v: v > lo):
        fail(obj, name, f"must be {_noun(value)} > {lo}" + _end(why))


def at_least(obj, name: str, lo, why: str = "") -> None:
    """value >= lo (and finite); None passes."""
    value = getattr(obj, name)
    if value is not None and not _ok(value, lambda v: v >= lo):
        fail(obj, name, f"must be {_noun(value)} >= {lo}" + _end(why))


def in_range(obj, name: str, lo, hi, why: str = "", hi_open: bool = False) -> None:
    """lo <= value <= hi (value < hi with hi_open); None passes."""
    value = getattr(obj, name)
    if value is not None and not _ok(value, lambda v: lo <= v and (v < hi if hi_open else v <= hi)):
        fail(obj, name, f"must be {_noun(value)} in [{lo}, {hi}{')' if hi_open else ']'}" + _end(why))


def one_of(obj, name: str, choices, why: str = "") -> None:
    """value in choices (compared as given: the type check has run)."""
    if getattr(obj, name) not in choices:
        fail(obj, name, f"must be one of {', '.join(map(repr, choices))}" + _end(why))


def non_empty(obj, name: str, why: str = "") -> None:
    """A string field that must not be empty ("\\n" is fine: it is a truncation text)."""
    value = getattr(obj, name)
    if value == "":
        fail(obj, name, "must be a non-empty string" + _end(why))
