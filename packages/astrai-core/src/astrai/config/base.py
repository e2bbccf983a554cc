"""`BaseConfig` and `BaseModelConfig`: dataclass configs that coerce and validate their fields.

Every config checks its fields when it is built, whether by its constructor or by `from_dict`:
values are coerced to the annotated type where that is lossless (`"64"` -> 64, `2.0` -> 2, `"true"` -> True)
and rejected with a `ValueError` naming the field otherwise. Unknown keys in `from_dict` are errors too,
so a misspelt field never silently falls back to its default.

Fields whose dataclass metadata has `serialize=False` hold live objects (a model, a dataset, a callable);
they are left untouched by coercion and left out of `to_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, Union

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def live_field(**kwargs: Any) -> Any:
    """A dataclass field holding a live object: not coerced, not serialised."""
    return dataclasses.field(metadata={"serialize": False}, **kwargs)


@dataclasses.dataclass
class BaseConfig:
    """Base of all configs: `to_dict` / `from_dict` with coercion, and `validate` run after every build."""

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.metadata.get("serialize", True):
                value = getattr(self, f.name)
                setattr(self, f.name, coerce(value, hints[f.name], f"{type(self).__name__}.{f.name}"))
        self.validate()

    def validate(self) -> None:
        """Check cross-field constraints; subclasses raise `ValueError` naming the field and value."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values of every serialisable field, in declaration order."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("serialize", True):
                out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Build from plain values; unknown keys raise `ValueError` listing the known ones."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {names}")
        return cls(**d)

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (validated like any other build)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class BaseModelConfig(BaseConfig):
    """A model's config, stored as `config.json` beside its weights. `model_type` names the model class."""

    MODEL_TYPE: ClassVar[str | None] = None  # what `model_type` defaults to in subclasses
    model_type: str | None = None

    def __post_init__(self) -> None:
        if self.model_type is None:
            self.model_type = self.MODEL_TYPE
        super().__post_init__()

    @classmethod
    def from_file(cls, config_path: str | Path) -> Self:
        path = Path(config_path)
        raw = read_json_object(path)
        try:
            return cls.from_dict(raw)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_file(self, config_path: str | Path) -> None:
        """Write the config as JSON, leaving out unset (None) fields but always writing `model_type`."""
        data = {k: v for k, v in self.to_dict().items() if v is not None or k == "model_type"}
        Path(config_path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`; a missing file, bad JSON or a non-object raise `ValueError` naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a JSON object, got {type(raw).__name__}")
    return raw


# --- coercion -------------------------------------------------------------------------------------------


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` converted to `annotation`, or raise `ValueError` naming `where`."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {annotation}")
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
    if origin in (list, tuple, dict) or annotation in (list, tuple, dict):
        return _coerce_container(value, origin or annotation, args, where)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) and issubclass(annotation, BaseConfig):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return annotation.from_dict(value)
        raise ValueError(f"{where} must be a {annotation.__name__} or a dict, got {value!r}")
    if annotation is bool:
        return _to_bool(value, where)
    if annotation is int:
        return _to_int(value, where)
    if annotation is float:
        return _to_float(value, where)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where} must be a string, got {value!r}")
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise ValueError(f"{where} must be a {annotation.__name__}, got {value!r}")
    return value  # an annotation we do not check (a Callable, a Protocol): kept as given


def _coerce_container(value: Any, origin: type, args: tuple, where: str) -> Any:
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a dict, got {value!r}")
        if not args:
            return dict(value)
        key_t, val_t = args
        return {coerce(k, key_t, f"{where} key"): coerce(v, val_t, f"{where}[{k!r}]") for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} must be a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ValueError(f"{where} must have {len(args)} items, got {value!r}")
        return tuple(coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    item_t = args[0] if args else Any
    items = [coerce(v, item_t, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{where} must be a boolean, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{where} must be an integer, got {value!r}")


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            pass
        else:
            if not math.isnan(out):
                return out
    raise ValueError(f"{where} must be a number, got {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, BaseConfig):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]
