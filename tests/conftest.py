"""Shared test fixtures: the real sample clips in ../shared/data, read in place (never copied in)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STABLEDUB_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_clip(name: str) -> Path:
    path = SHARED_DATA / "video" / f"{name}.mp4"
    if not path.exists():
        raise FileNotFoundError(f"sample clip {path} missing: tests read ../shared/data (set STABLEDUB_SHARED_DATA)")
    return path


def shared_dub(language: str) -> Path:
    return SHARED_DATA / "dub" / f"tts_{language}.wav"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        raise FileNotFoundError(f"{SHARED_DATA} missing: tests read the real sample clips from ../shared/data")
    return SHARED_DATA
