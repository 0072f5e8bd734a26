"""Adapt stage: before a film is dubbed, fine-tune the model on each dubbed person's own footage.

Between face link and inpaint. One small stateful actor (like face link: every segment of a film
reaches it), which per film
1. gathers each dubbed person's own footage as the segments pass: the crops at the inpaint model's
   resolution, union and coarse masks, and the film's ORIGINAL audio features (not the dub), on the
   frames the sync expert calls speaking and in sync (`adapt.speaking_threshold` on the same
   smoothed per-frame sync probability face link decides with), at most `adapt.max_seconds`;
2. holds the film's segments meanwhile, spilled to the run directory (bytes in memory stay
   bounded by the footage, not by the film's length);
3. when the film's last segment is in, adapts every person with at least `adapt.min_seconds` of
   footage (`models.adapt.adapt`, run by `run_adaptation`: the plan's Ray task with the inpaint
   stage's resources), writes each adapter and its report, then the film's record, and releases
   the held segments with `track.info["adapter"]` naming the person's adapter folder; the inpaint
   stage dubs those tracks with `adapted(pipeline, load_adapter(folder))`.

Why this design (and not a second pass over the film driven by the driver): every segment is
decoded, tracked and linked once; only what adaptation needs is kept, and the held segments wait
on storage, not in memory. Films never wait for each other's footage: the stages before this one
keep working on later films and the ones after it on earlier films, and a film needs nothing but
its own segments to be adapted. Adaptations run one at a time (this actor waits on each), which
is what one GPU can do anyway; a film behind another waits for the adaptations ahead of it.

Reuse: a person's adapter is keyed by (film, person, base model identity, adapt config hash) and
its report is written after it (the completion marker), the film's record after all of them; a
rerun or resume finds the record (or the finished persons of a killed run) and adapts nothing
again. `adapt.reuse` (`stabledub run --adapt-from DIR`) takes the adapters `stabledub adapt`
wrote into DIR. The base checkpoint is only read; adapted weights go to the run directory only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Protocol

import numpy as np

from models.images import resize_square
from stages.base import WORKER, SegmentStage, StageError
from stages.face_link import FaceLinkConfig, eligible, frame_sync, sigmoid
from stages.inpaint import InpaintConfig
from stages.schema import FilmRef, Segment, Status, segments_from_batch, segments_to_batch
from stages.settings import Count, NonNegativeFloat, OneOf, PositiveFloat, Probability, Settings
from stages.storage import exists, join, read_bytes, read_json, remove_tree, write_bytes, write_json

log = logging.getLogger(__name__)
MIN_RUN_FRAMES = 8  # a stretch shorter than this is too short for the model's temporal layers (AdaptOptions.frames)


@dataclass
class AdaptConfig(Settings, section="adapt"):
    enabled: bool = False  # adapt the model to each dubbed person of a film before dubbing them (`stabledub run --adapt`)
    steps: Count = 150  # optimisation steps per person
    lr: PositiveFloat = 1e-4  # learning rate
    # lora: LoRA on the UNet's attention and Mamba projections (peft); habit+last: the lip-habit encoder and the last UNet blocks
    targets: Annotated[str, OneOf("lora", "habit+last")] = "lora"
    rank: Count = 8  # LoRA rank
    min_seconds: NonNegativeFloat = 4.0  # a person with less own speaking footage is dubbed with the base model
    max_seconds: PositiveFloat = 60.0  # own footage used per person at most (the first that qualifies)
    speaking_threshold: Probability = 0.5  # sync-expert speaking probability a frame needs to be used (own audio, in sync)
    seed: int = 0  # adaptation seed
    # a folder `stabledub adapt` wrote (`stabledub run --adapt-from DIR`): its adapters dub the films it has
    reuse: str = ""

    @property
    def active(self) -> bool:
        """The stage runs: adapting in this run, or using adapters made earlier."""
        return self.enabled or bool(self.reuse)

    def fingerprint(self) -> str:
        """What an adapter depends on besides the film, the person and the base model."""
        data = {k: v for k, v in asdict(self).items() if k not in ("enabled", "reuse")}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------- the base model
def model_identity(url: str) -> str:
    """Content hash of a StableDub checkpoint folder (every file's path and bytes): adapters made
    for it fit it and nothing else."""
    from models.remote import local_dir

    root = local_dir(url)
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def model_crop_size(url: str) -> int:
    """The crop side the checkpoint's UNet works at (what the inpaint stage resizes crops to)."""
    from models.remote import local_dir

    with open(os.path.join(local_dir(url), "unet", "config.json")) as f:
        return int(json.load(f)["sample_size"]) * 8


def is_checkpoint(url: str) -> bool:
    return exists(join(url, "model_index.json"))


# ------------------------------------------------------------------------------------- footage
@dataclass
class PersonFootage:
    """One person's own footage gathered so far (arrays at the model's crop size)."""

    crops: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    coarse: list[np.ndarray] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    frames: int = 0

    def add(self, crops: np.ndarray, masks: np.ndarray, coarse: np.ndarray, audio: np.ndarray) -> None:
        self.crops.append(crops)
        self.masks.append(masks)
        self.coarse.append(coarse)
        self.audio.append(audio)
        self.frames += len(crops)

    def footage(self, fps: float) -> Any:
        from models.adapt import Footage

        runs, at = [], 0
        for part in self.crops:
            runs.append((at, at + len(part)))
            at += len(part)
        return Footage(
            crops=np.concatenate(self.crops),
            masks=np.concatenate(self.masks),
            coarse=np.concatenate(self.coarse),
            audio=np.concatenate(self.audio).astype(np.float32),
            runs=runs,
            fps=fps,
        )


def speaking_runs(keep: np.ndarray, frame_index: np.ndarray, shortest: int = MIN_RUN_FRAMES) -> list[tuple[int, int]]:
    """Stretches [a, b) of track positions that are all kept and consecutive frames, at least `shortest` long."""
    breaks = np.concatenate([[True], np.diff(frame_index) != 1]) if len(frame_index) else np.zeros(0, bool)
    runs, start = [], None
    for i, k in enumerate(keep):
        if start is not None and (not k or breaks[i]):
            runs.append((start, i))
            start = None
        if k and start is None:
            start = i
    if start is not None:
        runs.append((start, len(keep)))
    return [(a, b) for a, b in runs if b - a >= shortest]


def frame_rate(segment: Segment) -> float:
    steps = np.diff(segment.pts)
    steps = steps[steps > 0]
    return float(1.0 / np.median(steps)) if len(steps) else 25.0


@dataclass
class AdaptJob:
    """One person's adaptation: what `adapt_person` needs, wherever it runs (a Ray task on a GPU)."""

    model_url: str
    footage: Any  # models.adapt.Footage
    config: AdaptConfig
    folder: str  # the adapter's folder; its report goes to folder + ".json" after it
    record: dict[str, Any]  # what the report says besides the adaptation's own numbers
    device: str = "auto"


def adapt_person(job: AdaptJob) -> dict[str, Any]:
    """Adapt a copy of the base model to one person's footage; write the adapter, then its report
    (the completion marker). Returns the report."""
    import torch

    from models.adapt import AdaptOptions, adapt, save_adapter
    from models.devices import resolve_device
    from models.pipeline_stabledub import StableDubPipeline

    device = resolve_device(job.device)
    pipeline = StableDubPipeline.from_pretrained(job.model_url)
    pipeline.to(device, torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    c = job.config
    options = AdaptOptions(steps=c.steps, lr=c.lr, targets=c.targets, rank=c.rank, seed=c.seed)
    began = time.perf_counter()
    result = adapt(pipeline, job.footage, options)
    save_adapter(result, job.folder)  # written whole under a temporary name, then renamed
    report = {k: _plain(v) for k, v in result.report.items()}
    record = {
        **job.record,
        "status": "adapted",
        "adapter": job.folder,
        "footage_seconds": round(len(job.footage.crops) / job.footage.fps, 3),
        "frames": int(len(job.footage.crops)),
        "steps": report.get("steps", c.steps),
        "seconds": round(float(report.get("seconds", time.perf_counter() - began)), 3),
        "loss_before": report.get("loss_before"),
        "loss_after": report.get("loss_after"),
        "device": str(device),
        "worker": WORKER,
        "report": report,
    }
    write_json(job.folder + ".json", record)
    return record


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


# ------------------------------------------------------------------------------------- the stage
@dataclass
class FilmAdaptation:
    persons: dict[int, PersonFootage] = field(default_factory=dict)
    dubbed: set[int] = field(default_factory=set)  # persons with a dubbed track somewhere in the film
    arrived: set[int] = field(default_factory=set)
    held: list[int] = field(default_factory=list)  # segment indices spilled, waiting
    failed: bool = False
    fps: float = 25.0
    record: dict[str, Any] | None = None  # the film's record once known (adapted now, earlier, or reused)
    error: str = ""  # why none of the film can be dubbed (adapters made for another model)


class AdaptPaths(Protocol):
    """Where adaptation keeps its files (the run directory's layout: pipeline/rundir.py)."""

    def adapt_record_url(self, film: FilmRef) -> str: ...

    def adapter_url(self, film: FilmRef, key: str, person: int) -> str: ...

    def held_segment_url(self, film: FilmRef, index: int) -> str: ...

    def held_dir(self, film: FilmRef) -> str: ...


class Adapt(SegmentStage):
    name = "adapt"

    def __init__(
        self,
        config: AdaptConfig,
        *,
        inpaint: InpaintConfig | None = None,
        face_link: FaceLinkConfig | None = None,
        adapt_paths: AdaptPaths | None = None,
        reuse_paths: AdaptPaths | None = None,
        run_adaptation: Callable[[AdaptJob], dict[str, Any]] | None = None,
    ) -> None:
        """`adapt_paths`: where this run keeps adapters, records and held segments (the run
        directory); `reuse_paths`: the same layout in `adapt.reuse`; `run_adaptation(job)`: where an
        adaptation runs (the plan's Ray task; default: here, `adapt_person`)."""
        super().__init__(config)
        self.settings = config
        self.link_settings = face_link or FaceLinkConfig()
        self.model_url = (inpaint or InpaintConfig()).model
        self.paths = adapt_paths
        self.reuse_paths = reuse_paths if config.reuse else None
        self.run_adaptation = run_adaptation or adapt_person
        self.usable = is_checkpoint(self.model_url)
        self.films: dict[str, FilmAdaptation] = {}
        self.identity = model_identity(self.model_url) if self.usable else ""
        self.size = model_crop_size(self.model_url) if self.usable else 0
        self.key = f"{self.identity}-{config.fingerprint()}"
        self.expert = None
        if self.usable and config.enabled:
            import torch

            from models.sync_expert import load_sync_expert

            torch.set_num_threads(1)
            self.expert, _ = load_sync_expert()

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        # a generator: a film's held segments leave one per block, never as one film-sized block
        out = False
        for segment in segments_from_batch(batch):
            for released in self.push(segment):
                out = True
                yield segments_to_batch([released])
        if not out:
            yield segments_to_batch([])

    def process(self, segment: Segment) -> Segment:
        """One whole film as one segment (tools, tests)."""
        (done,) = list(self.push(segment))
        return done

    # ------------------------------------------------------------------ per segment
    def push(self, segment: Segment) -> Iterator[Segment]:
        if segment.is_marker or not self.usable:
            if not self.usable and not segment.is_marker and segment.index == 0:
                segment.notes.append(f"adapt: inpaint.model {self.model_url!r} is not a StableDub checkpoint; nothing adapted")
            yield segment
            return
        uid = segment.film.uid
        film = self.films.get(uid)
        if film is None:
            film = self.films[uid] = FilmAdaptation(fps=frame_rate(segment) if len(segment.pts) > 1 else 25.0)
            try:
                film.record = self._known_record(segment.film)
            except StageError as error:
                film.error = f"{self.name}: {error}"
            if film.record is None and film.error == "" and self.paths is not None:
                remove_tree(self.paths.held_dir(segment.film))  # what a killed run held: it comes again
        if film.error and segment.status is Status.OK:
            segment.fail(film.error, stage=self.name)
        if segment.index in film.arrived:  # a retried task upstream: its first copy counts
            return
        film.arrived.add(segment.index)
        if film.record is not None or film.error or segment.status is Status.DONE:
            # adapted before (or reused), or encoded by an earlier run: nothing to wait for
            yield self._annotate(segment, film.record)
            self._forget_if_done(uid, segment)
            return
        began = time.perf_counter()
        if segment.status is Status.FAILED:
            film.failed = True
        else:
            try:
                self._gather(film, segment)
            except Exception as error:  # noqa: BLE001 - one bad segment fails only itself
                log.warning("adapt: gathering footage of %s segment %d failed: %s", uid, segment.index, error)
                segment.fail(f"{self.name}: {type(error).__name__}: {error}", stage=self.name)
                film.failed = True
        segment.timings[self.name] = segment.timings.get(self.name, 0.0) + time.perf_counter() - began
        segment.workers[self.name] = WORKER
        self._hold(segment)
        film.held.append(segment.index)
        if len(film.arrived) < segment.count:
            return
        record = None if film.failed else self._adapt_film(segment.film, film)
        film.record = record
        for index in sorted(film.held):
            yield self._annotate(self._unhold(segment.film, index), record)
        del self.films[uid]

    def _forget_if_done(self, uid: str, segment: Segment) -> None:
        if len(self.films[uid].arrived) >= segment.count:
            del self.films[uid]

    def _gather(self, film: FilmAdaptation, segment: Segment) -> None:
        """The segment's speaking, in-sync frames of every person (own frames only, overlap excluded)."""
        for track in segment.tracks:
            if track.speaking:
                film.dubbed.add(int(track.track_id))
        if not self.settings.enabled or self.expert is None:
            return
        features, voiced_all = segment.source_audio_features, segment.source_speech
        if features is None or voiced_all is None:
            return
        budget = int(round(self.settings.max_seconds * film.fps))
        for track in segment.tracks:
            if not eligible(track) or track.landmarks is None or track.coarse_mask is None:
                continue
            person = film.persons.setdefault(int(track.track_id), PersonFootage())
            if person.frames >= budget:
                continue
            voiced = np.asarray(voiced_all, bool)[track.frame_index]
            logits = frame_sync(self.expert, track, features[track.frame_index], voiced, self.link_settings)
            with np.errstate(invalid="ignore"):
                keep = np.isfinite(logits) & (sigmoid(logits) >= self.settings.speaking_threshold)
            keep &= track.frame_index >= segment.context  # overlap frames belong to the previous segment
            for a, b in speaking_runs(keep, track.frame_index):
                b = min(b, a + budget - person.frames)
                if b - a < MIN_RUN_FRAMES:
                    break
                person.add(
                    resize_square(track.crops[a:b], self.size),
                    resize_square(track.mask[a:b], self.size),
                    resize_square(track.coarse_mask[a:b], self.size),
                    features[track.frame_index[a:b]],
                )

    # ------------------------------------------------------------------ per film
    def _paths(self) -> AdaptPaths:
        if self.paths is None:
            raise RuntimeError("the adapt stage needs the run directory (adapt_paths) to store adapters")
        return self.paths

    def _known_record(self, film: FilmRef) -> dict[str, Any] | None:
        """The film's adaptation when it is known already: in `adapt.reuse`, or this run directory's
        for this model, config and input."""
        if self.reuse_paths is not None:
            url = self.reuse_paths.adapt_record_url(film)
            if exists(url):
                record = read_json(url)
                if record.get("model") != self.identity or record.get("crop_size") != self.size:
                    raise StageError(
                        f"adapters in {self.settings.reuse} were made for model {record.get('model')} at "
                        f"{record.get('crop_size')} px; this run's model is {self.identity} at {self.size} px"
                    )
                return self._record_here(film, {**record, "reused_from": url})
            if not self.settings.enabled:
                return self._record_here(film, {"persons": [], "reason": f"no adapters for this film in {self.settings.reuse}"})
        if self.paths is None:
            return None
        url = self.paths.adapt_record_url(film)
        if exists(url):
            record = read_json(url)
            if record.get("key") == self.key and record.get("input") == film.input_id:
                return record
        return None

    def _record_here(self, film: FilmRef, record: dict[str, Any]) -> dict[str, Any]:
        """What this run used, in its own run directory too (the film report reads it from there)."""
        if self.paths is not None:
            write_json(self.paths.adapt_record_url(film), record)
        return record

    def _adapt_film(self, ref: FilmRef, film: FilmAdaptation) -> dict[str, Any]:
        paths = self._paths()
        persons = []
        for person in sorted(film.dubbed):
            footage = film.persons.get(person, PersonFootage())
            seconds = footage.frames / film.fps
            base = {"person": person, "footage_seconds": round(seconds, 3), "frames": footage.frames}
            folder = paths.adapter_url(ref, self.key, person)
            done = folder + ".json"
            if exists(done):  # finished by a killed run
                persons.append({**read_json(done), "reused": True})
                continue
            if seconds < self.settings.min_seconds or footage.frames == 0:
                persons.append(
                    {
                        **base,
                        "status": "not adapted",
                        "reason": f"{seconds:.2f} s of own speaking footage (sync probability >= "
                        f"{self.settings.speaking_threshold:g}), under adapt.min_seconds {self.settings.min_seconds:g}",
                    }
                )
                continue
            job = AdaptJob(
                model_url=self.model_url,
                footage=footage.footage(film.fps),
                config=self.settings,
                folder=folder,
                record={"person": person, "model": self.identity, "crop_size": self.size, "config": asdict(self.settings)},
            )
            film.persons.pop(person, None)  # its arrays go with the job
            try:
                persons.append(self.run_adaptation(job))
            except Exception as error:  # noqa: BLE001 - a failed adaptation dubs the person with the base model
                log.warning("adapt: %s person %d failed: %s", ref.uid, person, error)
                persons.append({**base, "status": "not adapted", "reason": f"adaptation failed: {type(error).__name__}: {error}"})
        record = {
            "film": ref.key,
            "key": self.key,
            "model": self.identity,
            "model_url": self.model_url,
            "crop_size": self.size,
            "config": asdict(self.settings),
            "input": ref.input_id,
            "persons": persons,
        }
        write_json(paths.adapt_record_url(ref), record)  # last: the film's adaptation is done
        return record

    def _annotate(self, segment: Segment, record: dict[str, Any] | None) -> Segment:
        adapters = {int(p["person"]): p["adapter"] for p in (record or {}).get("persons", []) if p.get("status") == "adapted"}
        for track in segment.tracks:
            if track.speaking and int(track.track_id) in adapters:
                track.info["adapter"] = adapters[int(track.track_id)]
        return segment

    # ------------------------------------------------------------------ held segments
    def _hold(self, segment: Segment) -> None:
        write_bytes(self._paths().held_segment_url(segment.film, segment.index), pickle.dumps(segment, protocol=5))
        segment.drop_payload()

    def _unhold(self, film: FilmRef, index: int) -> Segment:
        url = self._paths().held_segment_url(film, index)
        segment = pickle.loads(read_bytes(url))
        remove_tree(url)
        return segment
