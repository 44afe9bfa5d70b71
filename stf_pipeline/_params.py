"""Type checks of method keyword arguments against the parameter dataclass's type hints.

``stf.fuse(cube, t, method="delta", window="five")`` should say that ``window`` must be an
integer, not fail deep inside a kernel with ``'<' not supported between 'str' and 'int'``.
:func:`check_param_types` reads the hints of the method's frozen parameter dataclass and checks
each given value before the dataclass is built, so every method gets the same wording. The
dataclass's own ``__post_init__`` still checks ranges and choices.

Understood hints: ``int``, ``float`` (an integer is accepted), ``bool``, ``str``, ``Literal[...]``
(the type of its choices), ``tuple[X, ...]`` and ``tuple[X, Y]`` (a list is accepted, as YAML gives
one), ``X | None`` and unions, and classes (``isinstance``). Anything else (``Any``, callables) is
left to the dataclass.
"""

from __future__ import annotations

import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np

from stf_pipeline.exceptions import MethodError

_NAMES: dict[Any, str] = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint`` (unknown hints fit anything)."""
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, numbers.Integral) and not _matches(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not _matches(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(_matches(value, type(choice)) for choice in args)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(item, args[0]) for item in value)
        return not args or (len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True)))
    if origin is None and isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    """``hint`` in words: ``an integer or None``, ``a tuple of numbers``, ``'strict' or 'either'``."""
    if hint in _NAMES:
        return _NAMES[hint]
    if hint is type(None) or hint is None:
        return "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is typing.Literal:
        return " or ".join(repr(choice) for choice in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(_describe(args[0]))}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    return getattr(hint, "__name__", str(hint))


def _plural(text: str) -> str:
    """``an integer`` -> ``integers``, ``a list of numbers`` -> ``lists of numbers``."""
    for single, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings")):
        if text == single:
            return many
    if text.startswith("a list of "):
        return "lists of " + text.removeprefix("a list of ")
    return text


def check_param_types(params_type: type, values: Mapping[str, Any], *, method: str) -> None:
    """Check keyword arguments against the type hints of the dataclass ``params_type``.

    Parameters
    ----------
    params_type : type
        A method's frozen parameter dataclass.
    values : mapping
        Parameter name -> value as the user passed it (names already known to be fields).
    method : str
        Method name for the message.

    Raises
    ------
    MethodError
        Naming the parameter, the expected type and the value given, e.g. ``delta: parameter
        window must be an integer, got 'five' (str)``.
    """
    hints = typing.get_type_hints(params_type)
    for name, value in values.items():
        hint = hints.get(name, Any)
        if not _matches(value, hint):
            raise MethodError(
                f"{method}: parameter {name} must be {_describe(hint)}, got {value!r} ({type(value).__name__})."
            )
