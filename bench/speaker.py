"""Who gets dubbed, over film-like composites with known ground truth: real talking-face clips from
../shared/data (video/) and the corpus (validation identities of the sync expert, never trained on)
pasted into 960x540 frames, one person speaking at a time (their own audio on the sound track, the
others' clips muted: moving mouths that do not match it), cut into 2 s segments with 4 overlap
frames and run through face track, audio and face link as the pipeline runs them.

Scenarios: two faces; three faces; turn-taking across a cut (the listener speaks in the second shot,
people at new places and sizes); a speaker who pauses (frozen mouth and silence for 1.4 s inside
the turn: still their turn, so still dubbed); two corpus validation identities.

Prints per scenario accuracy and id switches, then `RESULT speaker_accuracy <fraction of face
frames whose dub/no-dub decision is right>` and `RESULT id_switches <per minute of film>`
(a face frame whose id differs from that face's previous id counts one switch).
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
import scipy.io.wavfile
import skimage.data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.face_align import apply_affine, invert  # noqa: E402
from tests.stages.film_segments import FilmStages, cut_film  # noqa: E402
from training.shared_data import SHARED_DATA  # noqa: E402

FPS = 25.0
SIZE = (540, 960)
CORPUS = SHARED_DATA / "corpus"


def clip(name: str, count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` frames at 25 fps (nearest frame of the clip's own rate) and their 16 kHz audio."""
    folder = SHARED_DATA if (SHARED_DATA / "video" / f"{name}.mp4").exists() else CORPUS
    with av.open(str(folder / "video" / f"{name}.mp4")) as container:
        rate = float(container.streams.video[0].average_rate or FPS)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    picks = np.minimum(np.round((start + np.arange(count)) * rate / FPS).astype(int), len(frames) - 1)
    sr, audio = scipy.io.wavfile.read(folder / "audio" / f"{name}.wav")
    audio = audio.astype(np.float32) / 32768.0
    a0 = int(round(start / FPS * sr))
    sound = np.zeros(int(round(count / FPS * sr)), np.float32)
    part = audio[a0 : a0 + len(sound)]
    sound[: len(part)] = part
    return np.stack([frames[i] for i in picks]), sound


@dataclass
class Face:
    person: int  # ground-truth identity
    frames: np.ndarray
    side: int
    x: int
    y: int
    speaking: bool


def shot(faces: list[Face], audio: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Face]]:
    n = min(len(f.frames) for f in faces)
    scene = cv2.resize(skimage.data.rocket(), (SIZE[1], SIZE[0]), interpolation=cv2.INTER_AREA)  # a real scene, no face
    out = np.repeat(scene[None], n, axis=0)
    for f in faces:
        for i in range(n):
            out[i, f.y : f.y + f.side, f.x : f.x + f.side] = cv2.resize(
                f.frames[i], (f.side, f.side), interpolation=cv2.INTER_AREA
            )
    return out, audio[: int(round(n / FPS * 16000))], faces


def scenarios() -> dict[str, list[tuple[np.ndarray, np.ndarray, list[Face]]]]:
    out = {}
    a, sa = clip("vfhq_Jai7x2uHBJ8", 135)
    b, _ = clip("vfhq_GX80GoZmROw", 135)
    out["two faces"] = [shot([Face(0, a, 300, 80, 120, True), Face(1, b, 300, 560, 120, False)], sa)]
    a, sa = clip("vfhq_1vYEVO9838Y", 146)
    b, _ = clip("vfhq_M9jEvhWC8Xg", 146)
    c, _ = clip("vfhq_3t9KvS55n5M", 146)
    out["three faces"] = [
        shot([Face(0, a, 260, 20, 140, True), Face(1, b, 260, 350, 140, False), Face(2, c, 260, 680, 140, False)], sa)
    ]
    a, sa = clip("vfhq_ZFz2jQpkS-E", 146)
    b, sb = clip("vfhq_L1WuDAMZTgo", 146)
    out["turn-taking across a cut"] = [
        shot([Face(0, a[:72], 300, 80, 120, True), Face(1, b[:72], 300, 560, 120, False)], sa[: 72 * 640]),
        shot([Face(1, b[72:], 380, 60, 80, True), Face(0, a[72:], 240, 640, 200, False)], sb[72 * 640 :]),
    ]
    a, sa = clip("vfhq_M9jEvhWC8Xg", 146)
    b, _ = clip("vfhq_1vYEVO9838Y", 146)
    a = a.copy()
    a[50:85] = a[50]  # the speaker pauses: mouth still, no sound
    sa = sa.copy()
    sa[50 * 640 : 85 * 640] = 0.0
    out["speaker who pauses"] = [shot([Face(0, a, 300, 560, 120, True), Face(1, b, 300, 80, 120, False)], sa)]
    validation = [r["name"] for r in csv.DictReader(open(CORPUS / "corpus.csv")) if r["name"] in VALIDATION]
    if len(validation) >= 2:
        a, sa = clip(validation[0], 125)
        b, _ = clip(validation[1], 125)
        out["corpus validation identities"] = [shot([Face(0, a, 300, 80, 120, True), Face(1, b, 300, 560, 120, False)], sa)]
    return out


VALIDATION = ("talking-face_pc-avs_620900105", "talking-face_pc-avs_517600055")


def evaluate(stages: FilmStages, shots: list[tuple[np.ndarray, np.ndarray, list[Face]]]) -> tuple[int, int, int, int]:
    """(right decisions, face frames, id switches, film frames) of one composite film."""
    frames = np.concatenate([s[0] for s in shots])
    audio = np.concatenate([s[1] for s in shots])
    truth: list[tuple[int, int, Face]] = []  # (first film frame, last+1, face)
    t0 = 0
    for s in shots:
        for f in s[2]:
            truth.append((t0, t0 + len(s[0]), f))
        t0 += len(s[0])
    released = stages.run(cut_film(frames, audio))
    dubbed: dict[tuple[int, int], bool] = {}
    ident: dict[tuple[int, int], int] = {}
    for segment in released:
        for track in segment.tracks:
            film_frames = segment.context_start + track.frame_index
            centres = [apply_affine(invert(a), np.array([[128.0, 128.0]]))[0] for a in track.affine]
            for t, (cx, cy) in zip(film_frames, centres):
                if not segment.start <= t < segment.stop:
                    continue
                for g, (a, b, face) in enumerate(truth):
                    if a <= t < b and face.x <= cx < face.x + face.side and face.y <= cy < face.y + face.side:
                        dubbed[(g, int(t))] = dubbed.get((g, int(t)), False) or track.speaking
                        ident[(face.person, int(t))] = track.track_id
    right = total = 0
    for g, (a, b, face) in enumerate(truth):
        for t in range(a, b):
            total += 1
            right += dubbed.get((g, t), False) == face.speaking
    switches = 0
    for person in {f.person for *_, f in truth}:
        ids = [ident[(person, t)] for t in range(len(frames)) if (person, t) in ident]
        switches += sum(1 for x, y in zip(ids[:-1], ids[1:]) if x != y)
    return right, total, switches, len(frames)


def main() -> None:
    stages = FilmStages()
    right = total = switches = film_frames = 0
    for name, shots in scenarios().items():
        r, n, s, f = evaluate(stages, shots)
        print(f"{name}: accuracy {r / n:.3f} ({r}/{n} face frames), id switches {s} in {f / FPS:.1f} s")
        right, total, switches, film_frames = right + r, total + n, switches + s, film_frames + f
    print(f"RESULT speaker_accuracy {right / total:.4f}")
    print(f"RESULT id_switches {switches / (film_frames / FPS / 60.0):.3f}")


if __name__ == "__main__":
    main()
