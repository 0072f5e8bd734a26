"""Typed settings: allowed values declared next to a config field (`Annotated[int, Range(0, 51)]`),
checked by one rule when a config is built in Python and when it is loaded, and the one loader of
any config dataclass from a YAML/JSON file plus `key=value` / `section.key=value` overrides."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Protocol, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used: unreadable, unknown key, wrong type or a value not allowed."""


class SettingError(ConfigError):
    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={value!r} is not allowed; allowed: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


class Marker(Protocol):
    def allows(self, value: Any) -> bool: ...

    def describe(self) -> str: ...


class OneOf:
    def __init__(self, *values: str) -> None:
        self.values = values

    def allows(self, value: Any) -> bool:
        return value in self.values

    def describe(self) -> str:
        return ", ".join(self.values)


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    above: bool = False  # `low` itself is excluded

    def allows(self, value: Any) -> bool:
        if not isinstance(value, (int, float)):
            return False
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.low:g} to {self.high:g}" if not self.above else f"above {self.low:g}, at most {self.high:g}"
        if self.low is not None:
            return f"above {self.low:g}" if self.above else f"at least {self.low:g}"
        return f"at most {self.high:g}"


@dataclass(frozen=True)
class Pattern:
    regex: str
    description: str

    def allows(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(self.regex, value) is not None

    def describe(self) -> str:
        return self.description


Count = Annotated[int, Range(1)]  # at least one
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, above=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Probability = Annotated[float, Range(0, 1)]
DEVICE = r"cpu|cuda(:\d+)?|mps"  # a torch device
TorchDevice = Annotated[str, Pattern(DEVICE, "cpu, cuda, cuda:N or mps")]


class Settings:
    """Base of config dataclasses: `__post_init__` checks every field against its markers.

    `section` (a class keyword) is where the class sits in its loaded file, so a refusal names the
    key as the user writes it: `class EncodeConfig(Settings, section="encode")` -> `encode.crf`.
    """

    section: ClassVar[str] = ""

    def __init_subclass__(cls, section: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.section = section

    def __post_init__(self) -> None:
        check_fields(self, self.section)


def check_fields(config: Any, where: str = "") -> None:
    """Raise SettingError for the first field whose value one of its markers refuses."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for marker in markers(hints[f.name]):
            if not marker.allows(value):
                raise SettingError(_join(where, f.name), value, marker.describe())


def markers(hint: Any) -> list[Marker]:
    if typing.get_origin(hint) is Annotated:
        return [m for m in hint.__metadata__ if hasattr(m, "allows")]
    return []


def allowed_values(cls: type, name: str) -> tuple[str, ...]:
    """The choices a field's OneOf marker allows (for `argparse` choices and messages)."""
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    return next(m.values for m in markers(hint) if isinstance(m, OneOf))


# ------------------------------------------------------------------------------------ loading
def load_settings(
    cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = (), where: str | None = None
) -> T:
    """`cls` from its defaults, then the file at `path` (JSON if it ends in .json, else YAML), then
    `key=value` overrides (dotted keys reach into sections; values are read as YAML scalars).

    Every refusal is a ConfigError naming the key (prefixed with `where`, default the class's section).
    """
    where = getattr(cls, "section", "") if where is None else where
    data = read_mapping(path) if path else {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return build(cls, data, where)


def read_mapping(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
        loaded = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except OSError as error:
        raise ConfigError(f"config file {path}: {error.strerror or error}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ConfigError(f"config file {path}: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return loaded


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"{item!r}: expected key=value (section.key=value for a section)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {'.'.join(parts[: i + 1])} is not a section")
    node[parts[-1]] = value


def build(cls: type[T], data: Any, where: str = "", base: T | None = None) -> T:
    """`base` (default `cls()`) with the keys of `data` replaced, coerced to the field types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{_join(where, str(unknown[0]))}: unknown key; known: {', '.join(names)}")
    changes = {key: _coerce(value, hints[key], _join(where, key), getattr(base, key)) for key, value in data.items()}
    return dataclasses.replace(base, **changes)


def _coerce(value: Any, annotation: Any, where: str, current: Any = None) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or str(origin) == "types.UnionType":
        return _coerce_union(value, args, where)
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, where, current)
    if origin is dict:
        return _coerce_dict(value, args[1] if args else Any, where, current)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        coerced = [_coerce(v, args[0] if args else Any, where) for v in value]
        return tuple(coerced) if origin is tuple else coerced
    if annotation is bool:
        return _coerce_bool(value, where)
    if annotation in (int, float, str):
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    return value


def _coerce_union(value: Any, args: tuple[Any, ...], where: str) -> Any:
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except ConfigError:
            continue
    raise ConfigError(f"{where}: {value!r} is not one of {[getattr(a, '__name__', str(a)) for a in args]}")


def _coerce_dict(value: Any, item: Any, where: str, current: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    if dataclasses.is_dataclass(item) and current:
        # A table of named entries (resources per stage): entries given are merged into the defaults.
        unknown = sorted(set(value) - set(current))
        if unknown:
            raise ConfigError(f"{_join(where, str(unknown[0]))}: unknown key; known: {', '.join(current)}")
        return {**current, **{k: build(item, v, _join(where, k), current[k]) for k, v in value.items()}}
    return {k: _coerce(v, item, _join(where, k)) for k, v in value.items()}


def _coerce_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected true/false, got {value!r}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
