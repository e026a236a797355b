"""How params.yaml's values are read and refused, beside the typed sections of `bertpipe.config`.

- `dvc_equal`: a value that Python (and so DVC) deems equal to a valid one is read as that one:
  `512.0` in an integer field is 512, `1` in a true/false field is true.
- `config_error`: pydantic's first validation error as one line naming the dotted key, the value and what
  is allowed (`params.yaml: key = value is not allowed; expected ...`).
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ValidationError

from bertpipe.errors import ConfigError

NONE = type(None)


def dvc_equal(value: Any, annotation: Any) -> Any:
    """`value`, or the value of the field's own type that Python deems equal to it: DVC decides a stage
    is up to date by Python's `==` on the values (`bertpipe.config.Section`). A true/false field that
    also takes null (`prepare.strip_accents`) reads 0 and 1 alike; no number equals null."""
    kinds = _kinds(annotation)
    if isinstance(value, float) and value.is_integer() and int in kinds and float not in kinds:
        return int(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and value in (0, 1) and kinds - {NONE} == {bool}:
        return bool(value)
    return value


def _kinds(hint: Any) -> set[Any]:
    """The plain types a field annotation admits (Literal values count as their types)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _kinds(args[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*map(_kinds, args))
    if origin is Literal:
        return {type(arg) for arg in args}
    return {origin or hint}


_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
           "less_than": ("lt", "<")}


def config_error(err: ValidationError, cls: type[BaseModel], raw: dict) -> ConfigError:
    """The first error as `params.yaml: key = value is not allowed; expected ...`."""
    first = err.errors()[0]
    if first["type"] == "value_error" and isinstance(first["ctx"]["error"], ConfigError):
        return first["ctx"]["error"]  # a cross-field rule: it names its own key
    path, model, value = _locate(first["loc"], cls, raw)
    key = ".".join(map(str, path))
    if path[-1] not in model.model_fields:
        return ConfigError(key, value, f"one of the keys {sorted(model.model_fields)}")
    field_errors = [e for e in err.errors() if tuple(e["loc"][:len(path)]) == tuple(path)]
    return ConfigError(key, value, _allowed(field_errors, model.model_fields[path[-1]].annotation))


def _locate(loc: tuple, cls: type[BaseModel], raw: Any) -> tuple[list, type[BaseModel], Any]:
    """The path of keys in `loc` that exist in `raw` (union member tags cut off), the model holding the
    last of them, and its raw value."""
    path, parent, value = [], cls, raw
    for part in loc:
        if not isinstance(value, dict) or part not in value:
            break
        if path:
            annotation = parent.model_fields[path[-1]].annotation
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                break
            parent = annotation
        path.append(part)
        value = value[part]
    return path, parent, value


def _allowed(errors: list[dict], annotation: Any) -> str:
    """What the field takes: the violated range or pattern when the type was right, else its type."""
    for error in errors:
        if error["type"] in _BOUNDS:
            name, symbol = _BOUNDS[error["type"]]
            return f"a value {symbol} {error['ctx'][name]}"
        if error["type"] == "string_pattern_mismatch":
            return f"a string matching {error['ctx']['pattern']}"
        if error["type"] == "finite_number":
            return "a finite number"
    return _describe(annotation)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _describe(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in args)
    if hint is NONE:
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(args) if len(args) > 1 else repr(args[0])
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}.get(hint, str(hint))
