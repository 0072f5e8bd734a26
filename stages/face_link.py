"""Face link stage: one id per person per film, and the dubbed speaker chosen over the whole shot.

The face track stage sees one segment; this stage sees a film's segments in order. It is one small
stateful actor (the plan gives it a pool of one): a segment's tracks continue the tracks of the
previous segment where they cover the same overlap frames (decoded twice), shots continue across
boundaries, and a face in a new shot takes the id of the person it looks like (stages/face_identity.py)
or a new one. Bytes in flight stay bounded: a segment waits here only until the `lookahead`
segments after it are linked (about 2 s each), and what is kept per film between segments is compact
(per person a descriptor, per open track a few boxes and sums).

Speakers (`face_track.speaker`): `auto` scores every frame of every track with the sync expert
(lips and mouth against the film's own log-mel windows, models/sync_expert.py) as a confidence over
about a second of voiced frames (`frame_sync_scores`) and adds the whole shot-track's mean (its
prior: a speaker keeps speaking through a pause); per shot one face at a time is dubbed, from the
shot's start the one whose whole shot-track scores best, and the dubbed face changes only when
another stays ahead (or the current one stays below `off_logit`) for `min_switch_frames` voiced
frames. `all`, `largest` (per shot, by the shot-track's median size) and `ids` (person ids
from metadata `dub_person_ids`, else `face_track.track_ids`) decide by person or track, not by
segment. A track is cut where its decision changes: the dubbed part becomes its own `Track`.

After linking, `Track.track_id` is the person id; `info` holds `shot` (film shot number),
`shot_track` (film-level track id) and `sync` (the dubbed part's mean sync probability).
Per segment a compact summary (persons, shots, frames, sync) and the film's linking state are
written beside the segment's outputs (`summary_url`): the film report reads the summaries, and a
resumed run picks the state up at the first segment it has to redo.
"""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from models.face_landmarks import LIP_CONTOUR_POINTS
from models.face_mediapipe import box_iou
from stages.base import WORKER, SegmentStage
from stages.face_identity import similarity
from stages.face_speaker import mouth_opening
from stages.face_track import FaceTrackConfig, dub_person_ids
from stages.schema import FilmRef, Segment, Status, Track, segments_from_batch, segments_to_batch
from stages.settings import Count, NonNegativeInt, Probability, Range, Settings
from stages.storage import exists, read_json, write_json

log = logging.getLogger(__name__)


@dataclass
class FaceLinkConfig(Settings, section="face_link"):
    lookahead: NonNegativeInt = 2  # segments linked after a segment before its speakers are chosen (they wait here)
    continue_iou: Probability = 0.3  # mean box IoU over shared overlap frames that continues a track into the next segment
    relink_frames: NonNegativeInt = 25  # a face found again this soon, near where a track ended and alike, continues it
    # Appearance similarity (stages/face_identity.py) at which a face in another shot is a known person:
    # measured on 78 corpus tracks: 2.7 % of pairs of different people reach 0.9, 94.7 % of pairs of one clip 2 s apart do.
    reid_similarity: Annotated[float, Range(0, 1)] = 0.9
    sync_window: Count = 25  # voiced frames over which a frame's sync logit is averaged
    contrast_offsets: Count = 15  # a frame's sync is compared with its median over audio offsets up to this many frames
    prior_weight: Annotated[float, Range(0, 1)] = 0.5  # share of the whole shot-track's mean in a frame's score
    on_logit: float = 0.0  # a face's score must pass this to be dubbed
    off_logit: float = -1.0  # the dubbed face stops when its score stays below this
    min_switch_frames: Count = 15  # voiced frames a change must hold before it happens (hysteresis)
    min_motion: Annotated[float, Range(0)] = 0.004  # frame-to-frame mouth opening change (mouth widths) of a talking mouth
    min_dub_frames: Count = 8  # dubbed runs shorter than this are not dubbed


# ------------------------------------------------------------------------------------- film state
@dataclass
class Person:
    id: int
    descriptor: list[float]  # running mean of the person's track descriptors
    tracks: int = 1


@dataclass
class ShotTrack:
    """One person's face through one shot of the film (across segments)."""

    id: int
    person: int
    shot: int
    tail: dict[int, list[float]]  # film frame -> box (x0, y0, x1, y1), the last segment's last frames
    last_frame: int
    descriptor: list[float]
    # segment index -> [sum of frame sync confidences over voiced frames, voiced frames, sum of face sizes, frames]
    evidence: dict[int, list[float]] = field(default_factory=dict)

    def prior(self) -> float | None:
        total = sum(e[0] for e in self.evidence.values())
        count = sum(e[1] for e in self.evidence.values())
        return total / count if count else None

    def size(self) -> float:
        frames = sum(e[3] for e in self.evidence.values())
        return sum(e[2] for e in self.evidence.values()) / frames if frames else 0.0


@dataclass
class ShotState:
    """The dubbing decision of one shot, carried from segment to segment."""

    current: int | None = None  # shot-track being dubbed
    pending: int | None = None  # shot-track (or -1: nobody) that is ahead of `current`
    held: int = 0  # voiced frames `pending` has been ahead
    started: bool = False  # a face of this shot has been dubbed


@dataclass
class FilmLinks:
    """What is kept of a film between its segments (all small)."""

    next_index: int = 0  # the next segment to link
    persons: list[Person] = field(default_factory=list)
    tracks: dict[int, ShotTrack] = field(default_factory=dict)  # open shot-tracks (the last segments' shots)
    shots: int = 0  # film shots so far
    next_track: int = 0  # the next shot-track id
    tail_shots: dict[int, int] = field(default_factory=dict)  # film frame -> film shot, the last segment's last frames
    decided: dict[int, dict[int, bool]] = field(default_factory=dict)  # shot-track -> film frame -> dubbed (overlap)
    decisions: dict[int, ShotState] = field(default_factory=dict)  # film shot -> its state

    def link_state(self) -> dict[str, Any]:
        """What linking the next segment needs (JSON, floats exact: a resumed run links alike)."""
        data = json_ready(asdict(self), exact=True)
        del data["decided"], data["decisions"]
        return data

    def decision_state(self) -> dict[str, Any]:
        """What deciding the next segment's speakers needs, besides its links (JSON, exact)."""
        return json_ready({"decided": self.decided, "decisions": asdict(self)["decisions"]}, exact=True)

    def restore_links(self, data: dict[str, Any]) -> None:
        """Take a saved `link_state`, in place: open shot-tracks keep their objects (segments linked
        before, still waiting for their decisions, hold them and see the evidence added here)."""
        self.next_index, self.shots, self.next_track = int(data["next_index"]), int(data["shots"]), int(data["next_track"])
        self.persons = [Person(**p) for p in data["persons"]]
        self.tail_shots = {int(k): int(v) for k, v in data["tail_shots"].items()}
        tracks = {}
        for key, value in data["tracks"].items():
            saved = ShotTrack(**_int_keys(value, "tail", "evidence"))
            track = self.tracks.get(int(key))
            if track is None:
                track = saved
            else:
                track.__dict__.update(saved.__dict__)
            tracks[int(key)] = track
        self.tracks = tracks

    def restore_decisions(self, data: dict[str, Any]) -> None:
        self.decided = {int(k): {int(f): bool(d) for f, d in v.items()} for k, v in data["decided"].items()}
        self.decisions = {int(k): ShotState(**v) for k, v in data["decisions"].items()}


def _int_keys(data: dict[str, Any], *names: str) -> dict[str, Any]:
    out = dict(data)
    for name in names:
        out[name] = {int(k): v for k, v in data[name].items()}
    return out


def json_ready(value: Any, exact: bool = False) -> Any:
    """Plain JSON values; floats rounded to 5 decimals unless `exact` (state a resumed run reads back)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v, exact) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v, exact) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist(), exact)
    if isinstance(value, (np.floating, float)):
        return float(value) if exact else round(float(value), 5)
    if isinstance(value, np.integer):
        return int(value)
    return value


# ------------------------------------------------------------------------------------- linking
def track_boxes(track: Track, context_start: int) -> dict[int, np.ndarray]:
    """Film frame -> face box in full-resolution pixels (from the crop transform: the crop's square)."""
    size = float(track.mask.shape[1])
    out = {}
    for f, a in zip(track.frame_index, track.affine):
        inverse = np.linalg.inv(np.vstack([a, [0, 0, 1]]))[:2]
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inverse.T
        out[int(context_start + f)] = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
    return out


def film_shots(segment: Segment, links: FilmLinks) -> np.ndarray:
    """(T,) film shot number per decoded frame: the segment's first shot continues the previous
    segment's shot at the same (overlap) frame, or right after its last frame (no overlap); every
    cut inside the segment starts a new film shot."""
    local = np.asarray(segment.shots if segment.shots is not None else np.zeros(len(segment.pts)), np.int64)
    first = segment.context_start
    continued = links.tail_shots.get(first)
    if continued is None and links.tail_shots and first == max(links.tail_shots) + 1:
        continued = links.tail_shots[max(links.tail_shots)]
    if continued is None:
        out = links.shots + local
    else:
        out = np.where(local > 0, links.shots + local - 1, continued)
    if len(out):
        links.shots = max(links.shots, int(out.max()) + 1)
    return out


def link_segment(segment: Segment, links: FilmLinks, settings: FaceLinkConfig) -> np.ndarray:
    """Give every track of `segment` its shot, shot-track and person; returns the film shot of every decoded frame."""
    shots = film_shots(segment, links)
    boxes_of: dict[int, dict[int, np.ndarray]] = {}
    claimed: set[int] = set()
    new: list[int] = []  # tracks that continue no open shot-track
    order = sorted(range(len(segment.tracks)), key=lambda i: (int(segment.tracks[i].frame_index[0]), i))
    for i in order:
        track = segment.tracks[i]
        boxes_of[i] = track_boxes(track, segment.context_start)
        track.info["shot"] = int(shots[track.frame_index[0]])
        if track.descriptor is None:
            track.descriptor = np.zeros(1, np.float32)
        open_track = _continued(track, boxes_of[i], track.info["shot"], links, settings, claimed)
        if open_track is None:
            new.append(i)
        else:
            claimed.add(open_track.id)
            track.track_id = open_track.person
            track.info["shot_track"] = open_track.id
    for i, person in zip(new, _persons_for(segment.tracks, new, links, settings)):
        track = segment.tracks[i]
        open_track = ShotTrack(
            id=links.next_track,
            person=person,
            shot=track.info["shot"],
            tail={},
            last_frame=-1,
            descriptor=track.descriptor.tolist(),
        )
        links.tracks[open_track.id] = open_track
        links.next_track += 1
        claimed.add(open_track.id)
        track.track_id = person
        track.info["shot_track"] = open_track.id
    # tails for the next segment: the last frames, which it decodes again as its overlap
    overlap = set(range(segment.stop - 8, segment.stop))
    for i, track in enumerate(segment.tracks):
        st = links.tracks[track.info["shot_track"]]
        tail = {f: b.tolist() for f, b in boxes_of[i].items() if f in overlap}
        st.tail = tail
        st.last_frame = max(st.last_frame, max(boxes_of[i]))
    links.tail_shots = {segment.context_start + t: int(s) for t, s in enumerate(shots) if segment.context_start + t in overlap}
    # shot-tracks not seen for a while are closed (their persons stay in the gallery)
    horizon = segment.stop - settings.relink_frames - 8
    links.tracks = {k: v for k, v in links.tracks.items() if v.last_frame >= horizon or k in claimed}
    return shots


def _continued(
    track: Track, boxes: dict[int, np.ndarray], shot: int, links: FilmLinks, settings: FaceLinkConfig, claimed: set[int]
) -> ShotTrack | None:
    best, best_score = None, 0.0
    first = min(boxes)
    for st in links.tracks.values():
        if st.shot != shot or st.id in claimed:
            continue
        shared = [f for f in st.tail if f in boxes]
        if shared:
            score = float(np.mean([box_iou(np.array(st.tail[f]), boxes[f]) for f in shared]))
            if score >= settings.continue_iou and score > best_score:
                best, best_score = st, score
            continue
        if st.tail and 0 < first - st.last_frame <= settings.relink_frames:
            old = np.array(st.tail[max(st.tail)])
            new = boxes[first]
            side = float(max(old[2] - old[0], old[3] - old[1]))
            near = np.linalg.norm((old[:2] + old[2:]) / 2 - (new[:2] + new[2:]) / 2) < side
            alike = similarity(np.array(st.descriptor), track.descriptor) >= settings.reid_similarity
            if near and alike and best is None:
                best, best_score = st, settings.continue_iou
    if best is not None and len(best.descriptor) == len(track.descriptor):
        best.descriptor = ((np.array(best.descriptor) + track.descriptor) / 2).tolist()
    return best


def _persons_for(tracks: list[Track], new: list[int], links: FilmLinks, settings: FaceLinkConfig) -> list[int]:
    """Persons of the `new` tracks of a segment (those that continue no open shot-track), chosen
    together: the assignment (Hungarian) of tracks to known persons with the most appearance
    similarity in all, over pairs at least `reid_similarity` alike, never a person already on
    screen beside the track (another track of its shot at the same frames); the rest are new persons."""
    span = {i: (int(tracks[i].frame_index[0]), int(tracks[i].frame_index[-1])) for i in range(len(tracks))}
    scores = np.full((len(new), len(links.persons)), -1.0)
    for row, i in enumerate(new):
        beside = {
            tracks[j].track_id
            for j in range(len(tracks))
            if j not in new
            and tracks[j].info["shot"] == tracks[i].info["shot"]
            and span[j][0] <= span[i][1]
            and span[i][0] <= span[j][1]
        }
        for col, person in enumerate(links.persons):
            if person.id not in beside and len(person.descriptor) == len(tracks[i].descriptor):
                scores[row, col] = similarity(np.array(person.descriptor), tracks[i].descriptor)
    scores[scores < settings.reid_similarity] = -1.0  # pairs not alike enough weigh nothing in the assignment
    chosen: dict[int, Person] = {}
    if scores.size:
        for row, col in zip(*linear_sum_assignment(scores, maximize=True)):
            if scores[row, col] >= settings.reid_similarity:
                chosen[row] = links.persons[col]
    out = []
    for row, i in enumerate(new):
        descriptor = tracks[i].descriptor
        person = chosen.get(row)
        if person is None:
            person = Person(id=len(links.persons), descriptor=descriptor.tolist(), tracks=0)
            links.persons.append(person)
        person.descriptor = ((np.array(person.descriptor) * person.tracks + descriptor) / (person.tracks + 1)).tolist()
        person.tracks += 1
        out.append(person.id)
    return out


# ------------------------------------------------------------------------------------- evidence
def moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over `window` entries, NaN entries skipped (NaN where the window has none)."""
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0)
    kernel = np.ones(window)
    # the "full" convolution's centred slice: mode="same" returns max(len, window) entries, so a
    # track shorter than the window (a short shot) would come back longer than itself
    first = (window - 1) // 2
    total = np.convolve(filled, kernel, mode="full")[first : first + len(values)]
    count = np.convolve(finite.astype(np.float64), kernel, mode="full")[first : first + len(values)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def mouth_moving(landmarks: np.ndarray, window: int, min_motion: float) -> np.ndarray:
    """(N,) bool: the mouth opening changes by at least `min_motion` mouth widths per frame (on
    average over `window` frames): a frozen or merely jittering mouth does not speak."""
    opening = mouth_opening(landmarks)
    step = np.abs(np.diff(opening, prepend=opening[:1]))
    return moving_mean(step, window) >= min_motion


def frame_sync(expert: Any, track: Track, audio: np.ndarray, voiced: np.ndarray, settings: FaceLinkConfig) -> np.ndarray:
    """(N,) the track's sync logit per frame, averaged over `sync_window` voiced frames at the best
    small offset (±2 frames); NaN on unvoiced frames (no evidence either way)."""
    return frame_sync_scores(expert, track, audio, voiced, settings)[0]


def frame_sync_scores(
    expert: Any, track: Track, audio: np.ndarray, voiced: np.ndarray, settings: FaceLinkConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) logits as `frame_sync` (their sigmoid: the sync probability) and (N,) confidences, the
    speaker choice's score; both NaN on unvoiced frames, both low where the mouth is still.

    The confidence is the expert's `window_confidence` (in the spirit of SyncNet's LSE-C): the logit
    plus how far it stands above the median over offsets ±`contrast_offsets`. The second part cancels
    what a face scores whatever the audio's timing (a talking face under someone else's voice often
    scores high at every offset), so a speaker whose logits the expert puts low still stands above a
    listener whose logits it puts high."""
    from models.sync_expert import expert_mouth, logits_at_offsets

    assert track.landmarks is not None
    lips = track.landmarks[:, list(LIP_CONTOUR_POINTS)]
    n = len(track.frame_index)
    if n < 3:
        return np.full(n, np.nan), np.full(n, np.nan)
    reach = settings.contrast_offsets
    mouth = expert_mouth(expert, track.crops, lips)
    found = logits_at_offsets(expert, lips, audio, range(-reach, reach + 1), mouth).astype(np.float64)
    table = np.full((found.shape[0], n), np.nan)  # fewer audio windows than frames (the film's end): no evidence there
    table[:, : found.shape[1]] = found[:, :n]
    table[:, ~voiced] = np.nan
    smoothed = np.stack([moving_mean(row, settings.sync_window) for row in table])
    near = smoothed[reach - 2 : reach + 3]
    best_offset = int(np.nanargmax(np.nanmean(near, axis=1))) if np.isfinite(near).any() else 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN frames (unvoiced) stay NaN
        median = np.nanmedian(smoothed, axis=0)
    logit = near[best_offset].copy()
    confidence = 2 * logit - median
    still = ~mouth_moving(track.landmarks, settings.sync_window, settings.min_motion)
    for score in (logit, confidence):
        score[~voiced] = np.nan
        score[still & voiced] = np.minimum(score[still & voiced], settings.off_logit - 2.0)
    return logit, confidence


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------------- decisions
@dataclass
class Linked:
    """A linked segment waiting for its lookahead: per track its film frames and frame scores."""

    segment: Segment
    frames: list[np.ndarray] = field(default_factory=list)  # per track: film frame numbers
    scores: list[np.ndarray] = field(default_factory=list)  # per track: frame sync confidences (NaN: unvoiced)
    logits: list[np.ndarray] = field(default_factory=list)  # per track: frame sync logits (NaN: unvoiced)
    snapshot: dict[str, Any] | None = None  # FilmLinks.link_state() right after linking this segment
    shots: np.ndarray | None = None  # (T,) film shot of every decoded frame
    # its shot-tracks (shared with the film's state, so later segments' evidence shows; kept here
    # because the film's state forgets a shot-track once its shot has ended)
    shot_tracks: dict[int, ShotTrack] = field(default_factory=dict)
    emit: bool = True  # False: a stand-in for a done segment the plan did not send (nothing to pass on)
    saved: dict[str, Any] | None = None  # a done segment's saved summary (its links and decisions)


def eligible(track: Track) -> bool:
    return "skipped" not in track.info


def decide_auto(item: Linked, links: FilmLinks, settings: FaceLinkConfig) -> list[np.ndarray]:
    """Per track of the segment: (N,) bool, dubbed at that frame (one face per shot at a time)."""
    segment = item.segment
    tracks = segment.tracks
    dub = [np.zeros(len(t.frame_index), bool) for t in tracks]
    position = [{int(f): k for k, f in enumerate(frames)} for frames in item.frames]
    for shot in sorted({int(t.info["shot"]) for t in tracks if eligible(t)}):
        members = [i for i, t in enumerate(tracks) if eligible(t) and t.info["shot"] == shot]
        if len({tracks[i].info["shot_track"] for i in members}) == 1:
            # One person in the shot (in this segment): the dub is theirs (long silences are the inpaint
            # stage's business), whatever the sync expert makes of a face it never saw.
            for i in members:
                dub[i][:] = True
            continue
        state = links.decisions.setdefault(shot, ShotState())
        priors = {i: item.shot_tracks[tracks[i].info["shot_track"]].prior() for i in members}
        if not state.started:
            # A shot's first speaker is the face whose whole shot-track (with the lookahead's
            # evidence) syncs best, from the shot's start: waiting for it to stay ahead for
            # `min_switch_frames` would leave the start of the turn undubbed.
            known = {i: p for i, p in priors.items() if p is not None}
            if known and max(known.values()) > settings.on_logit:
                state.current, state.started = int(tracks[max(known, key=known.get)].info["shot_track"]), True
        frames = sorted({int(f) for i in members for f in item.frames[i]})
        run_from = 0  # position in `frames` where `pending` took the lead
        for k, f in enumerate(frames):
            present = [i for i in members if f in position[i]]
            ids = {i: int(tracks[i].info["shot_track"]) for i in present}
            recorded = {i: links.decided.get(ids[i], {}).get(f) for i in present}
            if any(v is not None for v in recorded.values()):  # an overlap frame the previous segment decided
                for i in present:
                    dub[i][position[i][f]] = bool(recorded[i])
                run_from = k + 1
                continue
            if state.current is not None and state.current not in ids.values():
                state.current, state.pending, state.held = None, None, 0
            scores = {}
            for i in present:
                local = item.scores[i][position[i][f]]
                if np.isfinite(local):
                    prior = priors[i] if priors[i] is not None else local
                    scores[i] = settings.prior_weight * prior + (1 - settings.prior_weight) * local
            if scores:
                best = max(scores, key=scores.get)
                current_score = {ids[i]: v for i, v in scores.items()}.get(state.current)
                if state.current is not None and current_score is not None and current_score >= settings.off_logit:
                    target = ids[best] if scores[best] > current_score else state.current
                else:
                    target = ids[best] if scores[best] > settings.on_logit else None
                if target == state.current:
                    state.pending, state.held = None, 0
                elif target == (-1 if state.pending == -1 else state.pending) or (target is None and state.pending == -1):
                    state.held += 1
                else:
                    state.pending, state.held, run_from = (-1 if target is None else target), 1, k
                if state.pending is not None and state.held >= settings.min_switch_frames:
                    # A shot's first speaker is dubbed from the shot's start; a later change from
                    # where the new face took the lead.
                    back = 0 if not state.started else run_from
                    state.current = None if state.pending == -1 else state.pending
                    state.pending, state.held, state.started = None, 0, True
                    for g in frames[back:k]:
                        for i in members:
                            if g in position[i] and links.decided.get(int(tracks[i].info["shot_track"]), {}).get(g) is None:
                                dub[i][position[i][g]] = int(tracks[i].info["shot_track"]) == state.current
            for i in present:
                dub[i][position[i][f]] = ids[i] == state.current
    return dub


def decide_fixed(item: Linked, links: FilmLinks, mode: str, persons: set[int]) -> list[np.ndarray]:
    """all | largest (per shot and frame, the present face whose shot-track is largest) | ids."""
    tracks = item.segment.tracks
    dub = []
    for i, track in enumerate(tracks):
        if not eligible(track):
            dub.append(np.zeros(len(track.frame_index), bool))
        elif mode == "all":
            dub.append(np.ones(len(track.frame_index), bool))
        elif mode == "ids":
            dub.append(np.full(len(track.frame_index), track.track_id in persons))
        else:
            size = item.shot_tracks[track.info["shot_track"]].size()
            here = np.ones(len(track.frame_index), bool)
            for j, other in enumerate(tracks):
                if j == i or not eligible(other) or other.info["shot"] != track.info["shot"]:
                    continue
                other_size = item.shot_tracks[other.info["shot_track"]].size()
                if (other_size, -other.info["shot_track"]) > (size, -track.info["shot_track"]):
                    here &= ~np.isin(item.frames[i], item.frames[j])
            dub.append(here)
    return dub


def drop_short_runs(dub: np.ndarray, frames: np.ndarray, segment: Segment, shortest: int) -> np.ndarray:
    """Dubbed runs shorter than `shortest` frames inside the segment (not at its edges) are undone."""
    out = dub.copy()
    edges = np.flatnonzero(np.diff(np.concatenate([[0], dub.astype(np.int8), [0]])))
    for a, b in zip(edges[::2], edges[1::2]):
        at_edge = frames[a] <= segment.context_start or frames[b - 1] >= segment.stop - 1
        if b - a < shortest and not at_edge:
            out[a:b] = False
    return out


def take(track: Track, keep: np.ndarray) -> Track:
    """The part of a track at positions `keep` (bool): every per-frame array sliced alike."""
    fields = ("frame_index", "affine", "crops", "mask", "landmarks", "fine_mask", "coarse_mask", "occlusion", "generated")
    parts = {name: (None if getattr(track, name) is None else getattr(track, name)[keep]) for name in fields}
    return Track(track_id=track.track_id, speaking=track.speaking, info=dict(track.info), descriptor=track.descriptor, **parts)


def split_by_decision(track: Track, dub: np.ndarray, logits: np.ndarray) -> list[Track]:
    """A track as its dubbed part (speaking) and the rest (not speaking), each with its mean sync probability."""
    pieces = []
    for speaking in (True, False):
        keep = dub if speaking else ~dub
        if not keep.any():
            continue
        piece = take(track, keep) if not keep.all() else track
        piece.speaking = speaking
        voiced = logits[keep][np.isfinite(logits[keep])]
        piece.info = dict(track.info)
        piece.info["sync"] = round(float(sigmoid(voiced).mean()), 4) if len(voiced) else None
        pieces.append(piece)
    return pieces


# ------------------------------------------------------------------------------------- the stage
@dataclass
class FilmQueue:
    links: FilmLinks = field(default_factory=FilmLinks)
    waiting: dict[int, Segment] = field(default_factory=dict)  # arrived ahead of their turn
    linked: list[Linked] = field(default_factory=list)  # linked, waiting for their lookahead
    done_before: set[int] = field(default_factory=set)  # segments an earlier run finished


FINISHED_FILMS = 4096  # films remembered as finished (a late duplicate row of one must not open it again)


class FaceLink(SegmentStage):
    name = "face_link"

    def __init__(
        self,
        config: FaceLinkConfig,
        face_track: FaceTrackConfig | None = None,
        summary_url: Callable[[Segment], str] | None = None,
        done_segments: Callable[[FilmRef], set[int]] | None = None,
    ) -> None:
        """`summary_url(segment)`: where a segment's track summary goes; `done_segments(film)`: the
        film's segments an earlier run finished (the run directory's layout; None: nowhere, for
        tools and tests)."""
        super().__init__(config)
        self.settings = config
        self.track_settings = face_track or FaceTrackConfig()
        self.summary_url = summary_url
        self.done_segments = done_segments
        self.films: dict[str, FilmQueue] = {}
        self.finished: dict[str, None] = {}  # insertion-ordered set, the last FINISHED_FILMS films
        self._stand_ins: set[tuple[str, int]] = set()  # (film, index) linked from the run directory only
        self.expert = None
        if self.track_settings.speaker in ("auto", "active"):
            import torch

            from models.sync_expert import load_sync_expert

            torch.set_num_threads(1)  # a few small convolutions per track: one thread is plenty
            self.expert, _ = load_sync_expert()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: list[Segment] = []
        for segment in segments_from_batch(batch):
            out += self.push(segment)
        return segments_to_batch(out)

    def process(self, segment: Segment) -> Segment:
        """One whole film as one segment (tools, tests): linked and decided at once."""
        (done,) = self.push(segment) if segment.count == 1 else (segment,)
        return done

    def push(self, segment: Segment) -> list[Segment]:
        """Take one segment; return the segments whose decisions are final (in film order).

        Nothing waits forever: every segment of a film reaches this one actor (failed and done ones
        too: they pass in their turn, a failed one as a gap in the links), so a film's segments
        leave at the latest when its last segment arrives. A done segment that the plan did not
        send (its completion marker exists) is stood in for from its saved summary. A segment seen
        again (a retried task upstream) after its turn leaves at once if done, else is dropped:
        its first copy was already released."""
        if segment.is_marker:
            return [segment]
        uid = segment.film.uid
        queue = self.films.get(uid)
        late = uid in self.finished or (queue is not None and segment.index < queue.links.next_index)
        if late or (queue is not None and segment.index in queue.waiting):
            if segment.status is not Status.DONE:
                log.warning("face_link: %s segment %d arrived again after its turn; dropped", uid, segment.index)
                return []
            return [segment]
        if queue is None:
            queue = self.films[uid] = FilmQueue(done_before=self._done_before(segment.film))
        queue.waiting[segment.index] = segment
        released: list[Segment] = []
        while True:
            self._stand_in_done(queue, segment)
            if queue.links.next_index not in queue.waiting:
                break
            item = queue.waiting.pop(queue.links.next_index)
            linked = [Linked(item)]  # a segment whose linking fails still leaves, failed, in its turn
            self._timed(item, lambda s, linked=linked: linked.__setitem__(0, self._link(queue, s)))
            if item.status is Status.FAILED:
                _gap(queue.links)
            queue.linked.append(linked[0])
            queue.links.next_index = item.index + 1
            end = queue.links.next_index >= item.count
            while queue.linked and (len(queue.linked) > self.settings.lookahead or end):
                ready = queue.linked.pop(0)
                self._timed(ready.segment, lambda s, ready=ready: self._release(queue, ready))
                if ready.emit:
                    released.append(ready.segment)
        if queue.links.next_index >= segment.count and not queue.waiting and not queue.linked:
            del self.films[uid]
            self.finished[uid] = None
            while len(self.finished) > FINISHED_FILMS:
                del self.finished[next(iter(self.finished))]
        return released

    def _done_before(self, film: FilmRef) -> set[int]:
        """Listed once, when the film's first segment arrives here: nothing of the film has left this
        stage yet, so every completion marker found is an earlier run's (or an earlier actor's)."""
        if self.done_segments is None or self.summary_url is None:
            return set()
        try:
            return set(self.done_segments(film))
        except Exception:  # noqa: BLE001 - storage trouble: wait for the rows themselves
            log.warning("face_link: cannot list the finished segments of %s: %s", film.uid, traceback.format_exc())
            return set()

    def _stand_in_done(self, queue: FilmQueue, arrived: Segment) -> None:
        """The next segment has not arrived but an earlier run finished it: link it from its saved
        summary without waiting for it (the plan may not send it, or send it later: it then passes
        straight through)."""
        index = queue.links.next_index
        if index in queue.waiting or index not in queue.done_before or index >= arrived.count:
            return
        queue.waiting[index] = replace(arrived, index=index, status=Status.DONE, tracks=[], counts={}, notes=[])
        self._stand_ins.add((arrived.film.uid, index))

    def _timed(self, segment: Segment, work: Callable[[Segment], None]) -> None:
        """Like `run_one`: an error fails this segment only (the film's links then restart at a gap)."""
        began = time.perf_counter()
        try:
            work(segment)
        except Exception as error:  # noqa: BLE001 - one segment's crash must not stop the catalog
            log.warning("face_link failed on %s segment %d: %s", segment.film.uid, segment.index, traceback.format_exc())
            if segment.status is Status.DONE:  # finished work stays finished; only its links are lost
                segment.notes.append(f"{self.name}: {type(error).__name__}: {error}")
            else:
                segment.fail(f"{self.name}: {type(error).__name__}: {error}", stage=self.name)
        segment.timings[self.name] = segment.timings.get(self.name, 0.0) + time.perf_counter() - began
        segment.workers[self.name] = WORKER

    def _link(self, queue: FilmQueue, segment: Segment) -> Linked:
        links = queue.links
        item = Linked(segment, emit=(segment.film.uid, segment.index) not in self._stand_ins)
        self._stand_ins.discard((segment.film.uid, segment.index))
        if segment.status is Status.DONE:
            # Finished by an earlier run: its saved links stand in for linking it again, and its
            # saved decisions (at its release) for deciding it again, so the segments after it
            # come out as in an uninterrupted run.
            item.saved = self._saved_summary(segment)
            if item.saved is None or "links" not in item.saved:
                item.saved = None
                _gap(links)
            else:
                links.restore_links(item.saved["links"])
            return item
        if segment.status is not Status.OK:
            _gap(links)
            return item
        item.shots = link_segment(segment, links, self.settings)
        item.shot_tracks = {int(t.info["shot_track"]): links.tracks[t.info["shot_track"]] for t in segment.tracks}
        features = segment.source_audio_features
        usable = (
            self.expert is not None
            and features is not None
            and segment.source_speech is not None
            and tuple(features.shape[1:]) == (self.expert.config.audio_window, self.expert.config.audio_dim)
        )
        for track in segment.tracks:
            frames = segment.context_start + track.frame_index
            if usable and eligible(track):
                voiced = np.asarray(segment.source_speech, bool)[track.frame_index]
                logits, scores = frame_sync_scores(self.expert, track, features[track.frame_index], voiced, self.settings)
            else:
                logits = scores = np.full(len(frames), np.nan)
            item.frames.append(frames)
            item.logits.append(logits)
            item.scores.append(scores)
            new = (frames >= segment.start) & (frames < segment.stop)  # overlap frames count once
            voiced_new = new & np.isfinite(scores)
            face_px = float(track.info.get("face_px", 0.0))
            item.shot_tracks[track.info["shot_track"]].evidence[segment.index] = [
                float(scores[voiced_new].sum()),
                int(voiced_new.sum()),
                face_px * int(new.sum()),
                int(new.sum()),
            ]
        if self.expert is not None and not usable:
            segment.notes.append("face_link: no usable original audio features, dubbing the largest face of each shot")
        links.next_index = segment.index + 1
        item.snapshot = links.link_state()
        return item

    def _saved_summary(self, segment: Segment) -> dict[str, Any] | None:
        if self.summary_url is None:
            return None
        url = self.summary_url(segment)
        return read_json(url) if exists(url) else None

    def _release(self, queue: FilmQueue, item: Linked) -> None:
        segment = item.segment
        links = queue.links
        if segment.status is Status.DONE:
            if item.saved is not None and "decisions" in item.saved:
                links.restore_decisions(item.saved["decisions"])
            else:
                links.decided = {}
            return
        if segment.status is not Status.OK:
            return
        mode = self.track_settings.speaker
        auto = mode in ("auto", "active")
        usable = auto and any(np.isfinite(s).any() for s in item.scores)
        if auto and usable:
            dub = decide_auto(item, links, self.settings)
        else:
            persons = set(dub_person_ids(segment.film.metadata, self.track_settings.track_ids))
            dub = decide_fixed(item, links, "largest" if auto else mode, persons)
        dub = [drop_short_runs(d, f, segment, self.settings.min_dub_frames) for d, f in zip(dub, item.frames)]
        # the next segment's overlap frames keep these decisions
        tail = segment.stop - 8
        for track, d, frames in zip(segment.tracks, dub, item.frames):
            links.decided[int(track.info["shot_track"])] = {int(f): bool(x) for f, x in zip(frames, d) if f >= tail}
        live = {int(t.info["shot_track"]) for t in segment.tracks}
        links.decided = {k: v for k, v in links.decided.items() if k in live or k in links.tracks}
        summary = segment_summary(item, dub)
        pieces: list[Track] = []
        for track, d, logits in zip(segment.tracks, dub, item.logits):
            pieces += split_by_decision(track, d, logits)
        segment.tracks = pieces
        segment.counts["tracks_dubbed"] = sum(t.speaking for t in pieces)
        if self.summary_url is not None:
            # the state a resumed run picks up here: the links right after this segment was
            # linked, the decisions right after it was decided
            summary["links"] = item.snapshot
            summary["decisions"] = links.decision_state()
            write_json(self.summary_url(segment), summary)


def _gap(links: FilmLinks) -> None:
    """A segment that is missing (failed, or done without a summary): nothing continues across it."""
    links.tracks, links.tail_shots, links.decided = {}, {}, {}


def segment_summary(item: Linked, dub: list[np.ndarray]) -> dict[str, Any]:
    """What the film report needs of one segment, counted on its own frames (overlap excluded)."""
    segment = item.segment
    tracks = []
    shots: dict[int, list[int]] = {}
    for track, frames, d, logits in zip(segment.tracks, item.frames, dub, item.logits):
        new = (frames >= segment.start) & (frames < segment.stop)
        if not new.any():
            continue
        voiced = logits[new & d][np.isfinite(logits[new & d])]
        tracks.append(
            {
                "person": int(track.track_id),
                "shot": int(track.info["shot"]),
                "shot_track": int(track.info["shot_track"]),
                "frames": int(new.sum()),
                "dubbed": int((new & d).sum()),
                "sync_sum": round(float(sigmoid(voiced).sum()), 4),
                "sync_frames": int(len(voiced)),
                "face_px": track.info.get("face_px"),
                "skipped": track.info.get("skipped"),
            }
        )
    if item.shots is not None:
        for t in range(segment.context, len(item.shots)):
            span = shots.setdefault(int(item.shots[t]), [segment.context_start + t, segment.context_start + t + 1])
            span[1] = segment.context_start + t + 1
    return {"index": segment.index, "start": segment.start, "stop": segment.stop, "tracks": tracks, "shots": shots}
