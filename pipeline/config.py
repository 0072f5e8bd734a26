"""Run configuration: one dataclass per stage (owned by the stage module), loaded from YAML/JSON
and `--set section.key=value` overrides, validated with clear errors."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.audio import AudioConfig
from stages.decode import DecodeConfig
from stages.encode import EncodeConfig
from stages.face_track import FaceTrackConfig
from stages.inpaint import InpaintConfig
from stages.occlusion import OcclusionConfig
from pipeline.stage_table import STAGE_NAMES, STAGES, StageResources


class ConfigError(ValueError):
    pass


@dataclass
class SegmentConfig:
    target_seconds: float = 2.0  # segments are cut near this length, at keyframes where possible
    overlap_frames: int = 4  # context frames decoded before a segment's first frame
    max_seconds: float = 4.0  # cut even without a keyframe beyond this (seek decodes from one)


def _default_resources() -> dict[str, StageResources]:
    return {spec.name: dataclasses.replace(spec.resources) for spec in STAGES}


@dataclass
class PipelineConfig:
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    face_track: FaceTrackConfig = field(default_factory=FaceTrackConfig)
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    resources: dict[str, StageResources] = field(default_factory=_default_resources)
    # Which films' output depends on: everything but resources, so a rerun with more actors resumes.
    def output_fingerprint(self) -> dict[str, Any]:
        data = to_dict(self)
        data.pop("resources")
        return data


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or str(origin) == "types.UnionType":
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {annotation}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_mapping(annotation, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        coerced = [_coerce(v, item, where) for v in value]
        return tuple(coerced) if origin is tuple else coerced
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float, str):
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    return value


def _from_mapping(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    base = cls()
    for key, value in data.items():
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            merged = {**to_dict(current), **value}
            value = merged
        if key == "resources" and isinstance(value, dict):
            merged_resources = {k: to_dict(v) for k, v in current.items()}
            for stage, overrides in value.items():
                if stage not in STAGE_NAMES:
                    raise ConfigError(f"{where}.resources: unknown stage {stage!r}; stages: {STAGE_NAMES}")
                merged_resources[stage] = {**merged_resources[stage], **overrides}
            value = merged_resources
        setattr(base, key, _coerce(value, hints[key], f"{where}.{key}"))
    return base


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    data: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        try:
            loaded = yaml.safe_load(text) if str(path).endswith((".yaml", ".yml")) else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as error:
            raise ConfigError(f"config file {path}: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    return _from_mapping(PipelineConfig, data, "config")
