"""Real dubbing end to end: a StableDub checkpoint (tiny, random weights) through the whole pipeline
on real clips composited into a wider film frame, with two inpaint actors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.run import RunOptions, run
from pipeline.shards import PackItem, pack
from stages.audio import audio_signature
from tests.conftest import clip_excerpt, shared_clip, shared_dub
from tests.stages.test_inpaint import save_tiny_checkpoint

pytestmark = pytest.mark.slow
FRAME = (540, 960)  # film frame (h, w)
FACE = (120, 400, 320)  # the clip is pasted at (y, x) scaled to this side


FILM_FRAMES = 60  # 2.4 s of each clip: three 1 s segments with their overlaps are all this test needs


def composite(clip: Path, path: Path, frames: int = FILM_FRAMES) -> None:
    """The clip's first `frames` frames, its face scaled into a wider film frame over a textured background,
    with the same stretch of its audio."""
    background = np.random.default_rng(1).integers(40, 200, (*FRAME, 3), dtype=np.uint8)
    y, x, side = FACE

    def in_film(frame: av.VideoFrame) -> np.ndarray:
        image = background.copy()
        image[y : y + side, x : x + side] = frame.to_ndarray(format="rgb24", width=side, height=side)
        return image

    clip_excerpt(clip, path, frames, in_film)


def decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_a_real_model_dubs_films_on_two_actors_and_touches_only_the_lower_face(tmp_path):
    import ray

    films = {"interview": "vfhq_1vYEVO9838Y", "microphone": "vfhq_L1WuDAMZTgo"}
    for key, clip in films.items():
        composite(shared_clip(clip), tmp_path / f"{key}.mp4")
    (shard,) = pack(
        [PackItem(str(tmp_path / f"{k}.mp4"), str(shared_dub("fr")), k) for k in films], str(tmp_path / "in-{0000..0000}.tar")
    )
    signature = audio_signature(load_config().audio)
    model = save_tiny_checkpoint(tmp_path / "tiny", signature["audio_window"], signature["audio_dim"])
    common = ["inpaint.steps=2", "resources.inpaint.min_actors=2", "resources.inpaint.max_actors=2", "segment.target_seconds=1.0"]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        dubbed = run(
            RunOptions(
                input=shard,
                output=str(tmp_path / "out"),
                workdir=str(tmp_path / "work"),
                keep_intermediate=True,
                progress=False,
                config=load_config(None, [f"inpaint.model={model}", *common]),
            )
        )
        plain = run(
            RunOptions(
                input=shard,
                output=str(tmp_path / "plain"),
                progress=False,
                # grey, not identity: a film the identity model leaves unchanged keeps its original
                # stream, and the comparison outside the face must be against the same encoder
                config=load_config(None, ["inpaint.model=grey", *common]),
            )
        )
    finally:
        ray.shutdown()
    assert dubbed.films_ok == 2 and plain.films_ok == 2

    inpaint_workers = {
        json.loads(p.read_text())["workers"]["inpaint"]
        for p in (tmp_path / "work" / "segments").glob("*/*/?????.json")  # segment markers, not <n>.tracks.json
    }
    assert len(inpaint_workers) == 2, "both configured inpaint actors must take work"

    def members(out: Path) -> dict[str, bytes]:
        with tarfile.open(out / "in-0000.tar") as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}

    got, identity = members(tmp_path / "out"), members(tmp_path / "plain")
    y, x, side = FACE
    for key in films:
        report = json.loads(got[f"{key}.json"])
        output, reference = decode(got[f"{key}.mp4"]), decode(identity[f"{key}.mp4"])
        assert len(output) == FILM_FRAMES == report["frames"]
        with av.open(io.BytesIO(got[f"{key}.mp4"])) as container:
            assert [s.codec_context.name for s in container.streams.audio] == ["aac"]
        diff = np.abs(output.astype(np.int16) - reference).max(axis=-1)
        outside = np.ones(FRAME, bool)
        outside[y : y + side, x : x + side] = False
        assert diff[:, outside].mean() < 0.5 and np.percentile(diff[:, outside], 99.99) < 24  # codec noise only
        face = diff[:, y : y + side, x : x + side]
        rows = face.mean(axis=(0, 2))
        assert rows[side // 2 :].mean() > 3 * rows[: side // 4].mean(), "changes belong to the lower face"
        assert report["frames_changed"] > 0.5 * report["frames"]
    mic = json.loads(got["microphone.json"])
    assert mic["counts"].get("frames_occluded", 0) > 0, "the microphone in front of the mouth must be found"
