"""`stabledub preprocess`: film shards -> webdataset training shards of per-track segments.

The same Ray Data plan as `run` (plan -> decode -> face track -> occlusion -> audio), without
inpainting or encoding. The driver turns every track of every finished segment into one training
sample (aligned crops, union/fine/coarse masks, landmarks, occlusion, audio features, voice
activity, JSON metadata), filters it with a recorded reason, and appends it to the current output
shard; a new shard starts before one would pass `shard_bytes`.

Resume: a committed shard is followed by a completion marker per segment it holds (and per segment
that gave no sample), in the run directory layout of `pipeline/rundir.py`; the planner then skips
those segments, and films and input shards whose markers are all written.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Annotated, Any

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.lease import Lease
from pipeline.ledger import FilmState, Ledger, ShardState, Summary
from pipeline.plan import build_dataset, init_ray, open_run
from pipeline.rundir import RunDir
from pipeline.stage_table import PREPROCESS_STAGES
from stages.audio import audio_signature
from stages.face_speaker import mouth_opening
from stages.schema import FilmRef, Segment, Status, Track, from_row
from stages.settings import Count, NonNegativeFloat, NonNegativeInt, OneOf, Probability, Range, Settings
from stages.storage import join, remove_temporaries, write_json
from training.shards import ShardWriter, TrackSample, next_shard_index

log = logging.getLogger("stabledub")

OFFSET_ESTIMATORS = ("expert", "envelope")
# `affine` (full-resolution frame -> crop) and `frames` (film frame numbers) let `stabledub eval` paste
# crops back into the source film's frames and score the seams.
FIELDS = ("crops", "mask", "fine_mask", "coarse_mask", "landmarks", "occlusion", "audio", "vad", "silence", "frames", "affine")


@dataclass
class FilterConfig(Settings, section="filter"):
    """Which track segments become training samples."""

    min_frames: Count = 16  # too short: fewer frames than a training window
    min_face_px: NonNegativeFloat = 64.0  # face too small: cheek-to-cheek width in source pixels
    min_speech: Probability = 0.2  # no speech: fraction of frames with voice activity >= 0.5
    max_lag: Count = 8  # AV offsets searched, in frames each way
    shift_max: NonNegativeInt = 2  # |offset| up to this (with enough confidence) is corrected by shifting the audio
    drop_offset: Count = 5  # |offset| at least this (with enough confidence) drops the sample
    # expert: the sync expert's best offset (models/sync_expert.py, LSE-C as confidence); envelope:
    # mouth-opening change against audio-envelope change (correlation). bench/av_offset.py measures both.
    offset_estimator: Annotated[str, OneOf(*OFFSET_ESTIMATORS)] = "expert"
    # Confidence below which the offset is unknown (nothing shifted, nothing dropped), per estimator:
    # envelope: peak correlation minus the median over lags. On 2 s segments of the real sample clips
    # (all in sync) 0.15 still dropped 6 of 28 tracks: be conservative.
    min_confidence: Annotated[float, Range(-2, 2)] = 0.3  # a difference of correlations
    # expert: LSE-C (median sync distance over offsets minus the best), another scale. On 2 s segments
    # (bench/av_offset.py) 0.8 keeps 43 % of the estimates, 60 % of those within 1 frame, and drops
    # 1 of 40 in-sync real segments (the envelope at 0.3: 33 % kept, 33 % within 1 frame, 3 of 40).
    min_expert_confidence: NonNegativeFloat = 0.8
    min_correlation: Annotated[
        float, Range(-1, 1)
    ] = -1.0  # envelope only: poor audio-mouth correlation, peak correlation below this drops (off by default)


@dataclass
class PreprocessOptions:
    input: str | list[str]  # a shard pattern, or the shard URLs the CLI checked (--allow-missing)
    output: str
    config: PipelineConfig
    filters: FilterConfig = field(default_factory=FilterConfig)
    shard_bytes: int = 1 << 30
    audio: str = "dub"  # dub: the film's dub member (a corpus packs each clip with its own audio) | own
    workdir: str | None = None
    progress: bool = True

    @property
    def run_dir(self) -> str:
        return self.workdir or join(self.output, "_stabledub_preprocess")

    @cached_property
    def audio_signature(self) -> dict[str, Any]:
        """The audio features every sample is computed with (read once: whisper's comes from its config)."""
        return audio_signature(self.config.audio)


@dataclass
class AVOffset:
    """Audio-to-mouth offset: audio features shifted by `lag` frames line up best with the mouth."""

    lag: int
    correlation: float  # envelope: Pearson correlation at the best lag; expert: NaN (none)
    confidence: float  # envelope: best correlation minus the median over lags; expert: LSE-C
    estimator: str = "envelope"


def estimate_av_offset(opening: np.ndarray, envelope: np.ndarray, max_lag: int) -> AVOffset:
    """Best lag of mouth-opening change against audio-envelope change (positive: audio is late).

    Differences, not levels: a mouth held half open through a loud passage says nothing about sync.
    """
    a = np.diff(np.asarray(opening, np.float64))
    b = np.diff(np.asarray(envelope, np.float64))
    scores = []
    for lag in range(-max_lag, max_lag + 1):
        x, y = (a[: len(a) - lag], b[lag:]) if lag >= 0 else (a[-lag:], b[: len(b) + lag])
        if len(x) < 4 or x.std() < 1e-9 or y.std() < 1e-9:
            scores.append(0.0)
            continue
        scores.append(float(np.corrcoef(x, y)[0, 1]))
    scores_arr = np.array(scores)
    best = int(np.argmax(scores_arr))
    return AVOffset(
        lag=best - max_lag, correlation=float(scores_arr[best]), confidence=float(scores_arr[best] - np.median(scores_arr))
    )


@functools.lru_cache(maxsize=1)
def _sync_expert() -> Any:
    from models.sync_expert import load_sync_expert

    return load_sync_expert()[0]  # loaded once per process (the driver)


def expert_av_offset(
    lips: np.ndarray, audio: np.ndarray, max_lag: int, expert: Any = None, mouth: np.ndarray | None = None
) -> AVOffset:
    """Best audio offset by the sync expert (positive: audio is late); confidence is its LSE-C.

    `lips`: the track's landmarks at `expert.config.lip_points` (face track's smoothed ones, crop px);
    `audio`: the audio stage's per-frame windows; `mouth`: the mouth patches an expert that reads pixels needs
    (`expert_mouth`). Raises ValueError for features the expert was not trained on.
    """
    from models.sync_expert import sync_score

    expert = expert if expert is not None else _sync_expert()
    score = sync_score(expert, lips, audio, max_lag, mouth)
    return AVOffset(lag=score.offset, correlation=float("nan"), confidence=score.lse_c, estimator="expert")


def track_av_offset(
    landmarks: np.ndarray,
    audio: np.ndarray,
    estimator: str,
    max_lag: int,
    crops: np.ndarray | None = None,
    mouth: np.ndarray | None = None,
) -> tuple[AVOffset, str]:
    """A track's AV offset by `estimator` (landmarks (N, K, 2) of the face mesh, audio windows (N, W, F),
    and for an expert that reads the mouth's pixels its mouth patches, or the aligned crops (N, S, S, 3)).

    The expert refuses features it was not trained on (another audio encoder or window); the
    envelope estimate is used then, and the second value says why ('' otherwise)."""
    if estimator == "expert":
        from models.sync_expert import expert_mouth

        expert = _sync_expert()
        lips = landmarks[:, list(expert.config.lip_points)]
        try:
            if mouth is None and crops is not None:
                mouth = expert_mouth(expert, crops, lips)
            return expert_av_offset(lips, audio, max_lag, expert, mouth), ""
        except ValueError as error:
            fallback = f"expert refused the features: {error}"
    else:
        fallback = ""
    return estimate_av_offset(mouth_opening(landmarks), audio_envelope(audio), max_lag), fallback


def audio_envelope(features: np.ndarray) -> np.ndarray:
    """(T, W, F) log-mel windows -> (T,) loudness at each frame's centre."""
    centre = features.shape[1] // 2
    return features[:, max(0, centre - 1) : centre + 2].mean(axis=(1, 2))


def shift_frames(values: np.ndarray, lag: int) -> np.ndarray:
    """values[t + lag] at t, the edge repeated: moves late audio (lag > 0) back onto the frames."""
    index = np.clip(np.arange(len(values)) + lag, 0, len(values) - 1)
    return values[index]


def sample_key(film: FilmRef, segment: Segment, track: Track) -> str:
    # webdataset splits a member name at the first dot of its base name: keys carry none.
    return re.sub(r"[^A-Za-z0-9_\-]", "_", film.safe_key) + f"__s{segment.index:04d}_t{track.track_id}"


def track_sample(
    segment: Segment, track: Track, filters: FilterConfig, audio_signature: dict[str, Any]
) -> tuple[TrackSample | None, str, dict[str, Any]]:
    """One track of a finished segment -> (sample or None, rejection reason or '', metadata).

    `audio_signature` (stages.audio.audio_signature) goes into the metadata: training builds the model for it."""
    keep = track.frame_index >= segment.context  # context frames belong to the previous segment
    index = track.frame_index[keep]
    meta: dict[str, Any] = {
        "source": {"shard": segment.film.shard_url, "key": segment.film.key, "segment": segment.index, "track": track.track_id},
        "frames": [int(segment.context_start + index[0]), int(segment.context_start + index[-1] + 1)] if len(index) else [0, 0],
        "time": [float(segment.pts[index[0]]), float(segment.pts[index[-1]])] if len(index) else [0.0, 0.0],
        "fps": float(1.0 / np.median(np.diff(segment.pts))) if len(segment.pts) > 1 else 25.0,
        "speaking": bool(track.speaking),
        "face_px": track.info.get("face_px"),
        "yaw": track.info.get("yaw"),
        "jitter": track.info.get("jitter"),
        "speaker_sync": track.info.get("sync"),
        "audio_signature": audio_signature,
    }
    if len(index) < filters.min_frames:
        return None, "too short", meta
    if (track.info.get("face_px") or 0.0) < filters.min_face_px:
        return None, "face too small", meta
    assert segment.audio_features is not None and segment.voice_activity is not None and segment.silence is not None
    audio = segment.audio_features[index]
    vad = segment.voice_activity[index]
    speech = float((vad >= 0.5).mean())
    meta["speech_fraction"] = round(speech, 3)
    if speech < filters.min_speech:
        return None, "no speech", meta
    assert track.landmarks is not None
    offset, fallback = track_av_offset(track.landmarks[keep], audio, filters.offset_estimator, filters.max_lag, track.crops[keep])
    meta["av_offset"] = {
        "estimator": offset.estimator,
        "lag_frames": offset.lag,
        "confidence": round(offset.confidence, 4),
        "correlation": None if np.isnan(offset.correlation) else round(offset.correlation, 4),
        **({"fallback": fallback} if fallback else {}),
    }
    if offset.estimator == "envelope" and offset.correlation < filters.min_correlation:
        return None, "poor audio-mouth correlation", meta
    threshold = filters.min_expert_confidence if offset.estimator == "expert" else filters.min_confidence
    # A peak on the edge of the search range is no estimate: the true lag may lie anywhere beyond it.
    confident = offset.confidence >= threshold and abs(offset.lag) < filters.max_lag
    meta["av_offset"]["confident"] = bool(confident)
    if confident and abs(offset.lag) >= filters.drop_offset:
        return None, "large av offset", meta
    shift = offset.lag if confident and 0 < abs(offset.lag) <= filters.shift_max else 0
    meta["audio_shift_frames"] = shift
    if shift:
        audio, vad = shift_frames(audio, shift), shift_frames(vad, shift)
    pick = np.flatnonzero(keep)
    arrays = {
        "crops": track.crops[pick],
        "mask": track.mask[pick],
        "fine_mask": track.fine_mask[pick] if track.fine_mask is not None else track.mask[pick],
        "coarse_mask": track.coarse_mask[pick] if track.coarse_mask is not None else track.mask[pick],
        "landmarks": track.landmarks[pick].astype(np.float32),
        "occlusion": track.occlusion[pick] if track.occlusion is not None else np.zeros_like(track.mask[pick]),
        "audio": audio.astype(np.float32),
        "vad": vad.astype(np.float32),
        "silence": segment.silence[index].astype(bool),
        "frames": (segment.context_start + index).astype(np.int64),
        "affine": track.affine[pick].astype(np.float64),
    }
    meta["occlusion_fraction"] = round(float((arrays["occlusion"] > 127).mean()), 5)
    return TrackSample(sample_key(segment.film, segment, track), arrays, meta), "", meta


@dataclass
class PreprocessSummary(Summary):
    # `shards_written` counts new training shards; `shards_skipped`/`shards_failed` input shards.
    segments: int = 0
    samples: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def detail_parts(self) -> list[str]:
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        return [f"samples {self.samples} ({self.frames} frames) in {self.shards_written} new shard(s)", f"rejected: {rejected}"]


class PreprocessDriver(Ledger):
    """Turns finished segments into training samples; a segment is finished, and its marker written,
    once the training shard holding its samples is committed."""

    def __init__(self, options: PreprocessOptions, run: RunDir) -> None:
        super().__init__(run, PreprocessSummary())
        self.options = options
        self.writer = ShardWriter(options.output, options.shard_bytes, next_shard_index(options.output))
        self.uncommitted: list[tuple[Segment, list[dict[str, Any]]]] = []  # segments waiting for their shard's commit
        self.tracks: dict[str, list[dict[str, Any]]] = {}  # film uid -> records of its committed segments

    def segment_arrived(self, shard: ShardState, state: FilmState, segment: Segment) -> None:
        if segment.status is not Status.OK:  # done by an earlier run, or failed: nothing to sample
            self.segment_finished(shard, state, segment)
            return
        records = [self._sample(segment, track) for track in segment.tracks]
        if not segment.tracks:
            records.append({"segment": segment.index, "status": "rejected", "reason": "no face"})
            self._reject("no face")
        self.summary.segments += 1
        self.uncommitted.append((segment.drop_payload(), records))

    def _sample(self, segment: Segment, track: Track) -> dict[str, Any]:
        """Write one track's sample (or count its rejection); the record of what became of it."""
        sample, reason, meta = track_sample(segment, track, self.options.filters, self.options.audio_signature)
        record = {
            "segment": segment.index,
            "track": track.track_id,
            "status": "kept" if sample else "rejected",
            "reason": reason,
            "key": sample.key if sample else "",
            **{k: meta.get(k) for k in ("frames", "av_offset", "speech_fraction", "face_px")},
        }
        if sample is None:
            self._reject(reason)
            return record
        committed = self.writer.add(sample)
        self.summary.samples += 1
        self.summary.frames += len(sample.arrays["crops"])
        if committed:
            self._committed(committed)
        return record

    def _reject(self, reason: str) -> None:
        self.summary.rejected[reason] = self.summary.rejected.get(reason, 0) + 1

    def _committed(self, url: str | None) -> None:
        """Markers for every segment whose samples are now in committed shards.

        The segment being added when a commit makes room stays open until the next commit (a
        segment with several tracks may straddle two shards; a kill between them redoes it).
        """
        if url:
            self.summary.shards_written += 1
            log.info("wrote %s", url)
        uncommitted, self.uncommitted = self.uncommitted, []
        for segment, records in uncommitted:
            write_json(self.run.segment_url(segment) + ".json", {"records": records})
            self.tracks.setdefault(segment.film.uid, []).extend(records)
            self.segment_finished(*self.state_of(segment.film), segment)

    def film_complete(self, shard: ShardState, state: FilmState) -> None:
        film = state.film
        tracks = self.tracks.pop(film.uid, [])
        report = {"key": film.key, "status": "ok", "tracks": tracks, "kept": sum(t["status"] == "kept" for t in tracks)}
        write_json(self.run.film_url(film, ".json"), report)
        self.film_ok(shard, state, report)

    def shard_complete(self, shard: ShardState) -> None:
        self.shard_finished(shard)

    def finish(self) -> PreprocessSummary:
        # Also when no shard was open: segments that gave only rejections still need their markers.
        self._committed(self.writer.commit())
        self.close()
        return self.summary


def preprocess(options: PreprocessOptions) -> PreprocessSummary:
    began = time.perf_counter()
    options.audio_signature  # noqa: B018 - an unreadable Whisper config fails here, before Ray starts
    urls, run_dir = open_run(options.input, options.output, options.run_dir)
    with Lease(run_dir.url):
        fingerprint = {**options.config.output_fingerprint(), "filters": asdict(options.filters), "audio_source": options.audio}
        fingerprint.pop("inpaint", None)
        fingerprint.pop("encode", None)
        run_dir.check_config(fingerprint)
        remove_temporaries(run_dir.url)
        remove_temporaries(options.output, recursive=False)
        init_ray()
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = options.progress
        driver = PreprocessDriver(options, run_dir)
        config = dataclasses.replace(options.config, audio=dataclasses.replace(options.config.audio, source=options.audio))
        for row in build_dataset(urls, config, run_dir, stages=PREPROCESS_STAGES).iter_rows():
            driver.add(from_row(row))
        summary = driver.finish()
    summary.wall_seconds = time.perf_counter() - began
    write_json(run_dir.path("summary.json"), {**asdict(summary), "line": summary.line()})
    print(summary.line())
    return summary
