"""Inpainting models by name or URL.

An inpainting model takes one track's aligned crops with their masks, occlusion and the segment's
audio features, and returns new crops of the same shape. Built-in names:

- `identity`: returns the crops unchanged (paste-back must then be lossless; tests rely on it);
- `grey`: paints the whole mask region mid-grey (tests prove occluder pixels survive paste-back).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from stages.schema import Segment, Track


class InpaintModel(Protocol):
    def __call__(self, track: Track, segment: Segment) -> np.ndarray: ...


class IdentityModel:
    def __call__(self, track: Track, segment: Segment) -> np.ndarray:
        return track.crops.copy()


class GreyModel:
    def __call__(self, track: Track, segment: Segment) -> np.ndarray:
        out = track.crops.copy()
        out[track.mask > 0] = 128
        return out


BUILTIN = {"identity": IdentityModel, "grey": GreyModel}


def load_model(name_or_url: str, settings: Any = None, audio_config: Any = None) -> InpaintModel:
    """A built-in by name, a user class by `module:Class`, else a StableDub checkpoint path/URL."""
    if name_or_url in BUILTIN:
        return BUILTIN[name_or_url]()
    if ":" in name_or_url and "://" not in name_or_url and not name_or_url.startswith("/"):
        # "package.module:ClassName": a user's own model class, constructed without arguments
        import importlib

        module_name, _, class_name = name_or_url.partition(":")
        try:
            return getattr(importlib.import_module(module_name), class_name)()
        except (ImportError, AttributeError) as error:
            raise ValueError(f"model {name_or_url!r}: cannot import {class_name} from {module_name}: {error}") from None
    from stages.inpaint import InpaintConfig, StableDubInpainter
    from stages.storage import exists, join

    if not exists(join(name_or_url, "model_index.json")):
        raise ValueError(
            f"unknown model {name_or_url!r}: not a built-in ({', '.join(sorted(BUILTIN))}), not module:Class, "
            "and no StableDub checkpoint (model_index.json) there"
        )
    return StableDubInpainter(name_or_url, settings or InpaintConfig(), audio_config)
