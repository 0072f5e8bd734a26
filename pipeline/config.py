"""Run configuration: one dataclass per stage (owned by the stage module), loaded from YAML/JSON
and `--set section.key=value` overrides by the settings loader (stages/settings.py)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pipeline.stage_table import STAGES, StageResources
from stages.adapt import AdaptConfig
from stages.audio import AudioConfig
from stages.decode import DecodeConfig
from stages.encode import EncodeConfig
from stages.face_link import FaceLinkConfig
from stages.face_track import FaceTrackConfig
from stages.inpaint import InpaintConfig
from stages.occlusion import OcclusionConfig
from stages.settings import ConfigError, NonNegativeInt, PositiveFloat, Settings, load_settings, markers

__all__ = ["ConfigError", "PipelineConfig", "SegmentConfig", "config_reference", "load_config", "to_dict"]


@dataclass
class SegmentConfig(Settings, section="segment"):
    target_seconds: PositiveFloat = 2.0  # segments are cut near this length, at keyframes where possible
    overlap_frames: NonNegativeInt = 4  # context frames decoded before a segment's first frame
    max_seconds: PositiveFloat = 4.0  # cut even without a keyframe beyond this (seek decodes from one)


def _default_resources() -> dict[str, StageResources]:
    return {spec.name: dataclasses.replace(spec.resources) for spec in STAGES}


@dataclass
class PipelineConfig:
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    face_track: FaceTrackConfig = field(default_factory=FaceTrackConfig)
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    face_link: FaceLinkConfig = field(default_factory=FaceLinkConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
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


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Defaults, then the YAML/JSON file at `path`, then `section.key=value` overrides."""
    return load_settings(PipelineConfig, path, overrides)


# ------------------------------------------------------------------------------ reference
REFERENCE_START = "<!-- config-reference:start -->"
REFERENCE_END = "<!-- config-reference:end -->"


def config_reference() -> str:
    """Markdown tables of every config section and key: type, default, allowed values and the
    comment next to the field's definition (README.md's Configuration section embeds this)."""
    lines: list[str] = []
    defaults = PipelineConfig()
    for section in dataclasses.fields(PipelineConfig):
        value = getattr(defaults, section.name)
        if section.name == "resources":
            lines += _resources_table(value)
            continue
        lines += [f"**`{section.name}`**", "", "| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        lines += _rows(value, "")
        lines.append("")
    return "\n".join(lines)


def _rows(config: Any, prefix: str) -> list[str]:
    hints = typing.get_type_hints(type(config), include_extras=True)
    comments = _field_comments(type(config))
    rows: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            rows += _rows(value, f"{prefix}{f.name}.")
            continue
        hint = hints[f.name]
        cells = [f"`{prefix}{f.name}`", _type_name(hint), _default(value), _allowed(hint), comments.get(f.name, "")]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def _resources_table(resources: dict[str, StageResources]) -> list[str]:
    hints = typing.get_type_hints(StageResources, include_extras=True)
    comments = _field_comments(StageResources)
    names = list(resources)
    lines = [
        "**`resources.<stage>`** (defaults per stage)",
        "",
        "| key | type | allowed | " + " | ".join(f"`{n}`" for n in names) + " | description |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for f in dataclasses.fields(StageResources):
        hint = hints[f.name]
        cells = [f"`{f.name}`", _type_name(hint), _allowed(hint)]
        cells += [_default(getattr(resources[n], f.name)) for n in names] + [comments.get(f.name, "")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    return lines


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def _allowed(hint: Any) -> str:
    return "; ".join(m.describe() for m in markers(hint))


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if value == "":
        return '""'
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing `# comment`, or the comment block just above it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if match and not stripped.startswith(("def ", "@", "return")):
            comments[match.group(1)] = match.group(2) or " ".join(above)
        above = []
    return {name: text.strip() for name, text in comments.items() if text}


def embed_reference(readme: str) -> str:
    """`readme` with the text between the reference markers replaced by `config_reference()`."""
    start, end = readme.index(REFERENCE_START) + len(REFERENCE_START), readme.index(REFERENCE_END)
    return readme[:start] + "\n" + config_reference() + "\n" + readme[end:]


if __name__ == "__main__":  # python -m pipeline.config README.md: regenerate README's reference
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    target.write_text(embed_reference(target.read_text()))
