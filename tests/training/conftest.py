"""Fixtures for the training tests: one real clip (and the same clip with a silent dub) preprocessed once."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SHARED_DATA, shared_clip

CLIP = "frozen_298"  # the shortest sample clip (2.6 s): one segment


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Preprocessed training shards of CLIP with its own audio, plus a film with a silent dub."""
    from pipeline.config import load_config
    from pipeline.shards import PackItem, pack
    from training.preprocess import PreprocessOptions, preprocess

    root = tmp_path_factory.mktemp("corpus")
    silent = root / "silent.wav"
    with wave.open(str(silent), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(np.zeros(16000 * 3, np.int16).tobytes())
    shard = pack(
        [
            PackItem(str(shared_clip(CLIP)), str(SHARED_DATA / "audio" / f"{CLIP}.wav"), CLIP),
            PackItem(str(shared_clip(CLIP)), str(silent), "silent"),
        ],
        str(root / "films-{0000..0000}.tar"),
    )[0]
    options = PreprocessOptions(
        input=shard,
        output=str(root / "train"),
        config=load_config(None, ["occlusion.method=none"]),
        shard_bytes=64 << 20,
        progress=False,
    )
    summary = preprocess(options)
    return {"films": Path(shard), "train": root / "train", "options": options, "summary": summary}
