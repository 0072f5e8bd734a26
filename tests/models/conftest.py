"""Fixtures for the StableDub model tests: a one-thread torch, real clip crops from ../shared/data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.shared_data import SHARED_DATA


@pytest.fixture
def one_thread():
    """The CI machine has 2 cores shared with other jobs: two torch threads there mostly wait on
    each other (measured 10-50x slower than one thread under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    """Models fetched from URLs land in a per-test cache, not the user's."""
    monkeypatch.setenv("STABLEDUB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def read_clip(name: str, frames: int, size: int, start: int = 0) -> np.ndarray:
    """`frames` RGB frames of a sample clip resized to size x size, uint8 (N, size, size, 3)."""
    import av

    path = SHARED_DATA / "video" / f"{name}.mp4"
    if not path.exists():
        raise FileNotFoundError(f"sample clip {path} missing: tests read ../shared/data (set STABLEDUB_SHARED_DATA)")
    out = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= start:
                out.append(frame.to_ndarray(format="rgb24", width=size, height=size))
            if len(out) == frames:
                break
    return np.stack(out)


@pytest.fixture(scope="session")
def clip64() -> np.ndarray:
    """24 real face-centred frames of a VFHQ interview clip at 64x64."""
    return read_clip("vfhq_1vYEVO9838Y", 24, 64)
