"""A still sheet for a model card: source | dubbed, N frames of the speaking part, cropped to the face.

    python -m training.still_sheet MODEL SOURCE_VIDEO DUB_AUDIO OUT.png --frames 8
    python -m training.still_sheet --dubbed DUBBED.mp4 [--report DUBBED.json] SOURCE_VIDEO DUB_AUDIO OUT.png

The first form dubs SOURCE_VIDEO with DUB_AUDIO through the real pipeline (`stabledub run` on a
one-film shard, MODEL as `inpaint.model`: a checkpoint folder, `identity` or `grey`). The second
takes a film some run already dubbed; the face boxes and the dubbed frames come from that run's
film report (`--report`, the `<key>.json` beside `<key>.mp4` in its output shard), or, without one,
from an `identity` run over the same source and dub (the same face tracks and speaker choice).

The sheet has two rows (source, dubbed) of `--frames` tiles, spread evenly over the frames that
were dubbed (the dubbed faces' frame ranges in the report), each cropped to the dubbed face's box
there (the face track's box at that segment's middle frame, widened) and labelled with its frame
number and timecode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

TILE = 192  # pixels per tile side on the sheet
LABEL_W = 88  # the row labels' column
HEADER_H = 22  # each tile's frame number and timecode
BOX_MARGIN = 1.25  # the face box widened by this factor (square) so the chin and cheeks show


@dataclass
class Dubbed:
    """A dubbed film and its film report (faces with frame ranges and boxes, frame count, duration)."""

    video: str
    report: dict[str, Any]


def dub_film(model: str, video: str, dub: str, work: str) -> Dubbed:
    """Dub `video` with `dub` through the pipeline into `work`; the dubbed film and its report."""
    from pipeline.config import load_config
    from pipeline.run import RunOptions, run
    from pipeline.shards import PackItem, pack

    key = "sheet"
    shard = pack([PackItem(video, dub, key)], os.path.join(work, "input", "sheet-{0000..0000}.tar"))[0]
    out = os.path.join(work, "dubbed")
    config = load_config(None, [f"inpaint.model={model}"])
    summary = run(RunOptions(input=shard, output=out, config=config, workdir=os.path.join(work, "run"), progress=False))
    if summary.films_ok != 1:
        raise RuntimeError(f"the run did not dub the film (see {os.path.join(work, 'run', 'dead_letters.jsonl')})")
    with tarfile.open(os.path.join(out, os.path.basename(shard))) as tar:
        report = json.load(tar.extractfile(f"{key}.json"))  # type: ignore[arg-type]
        target = os.path.join(work, f"{key}.mp4")
        with open(target, "wb") as f:
            f.write(tar.extractfile(f"{key}.mp4").read())  # type: ignore[union-attr]
    return Dubbed(target, report)


def dubbed_frames(report: dict[str, Any]) -> list[int]:
    """The film frames a face was dubbed in (pasted into), sorted: the speaking part."""
    return sorted({f for face in report.get("faces") or [] for a, b in face.get("frames", []) for f in range(a, b)})


def pick_frames(report: dict[str, Any], count: int) -> list[int]:
    """`count` frames spread evenly over the dubbed frames (over the whole film when none was dubbed)."""
    frames = dubbed_frames(report) or list(range(int(report.get("frames") or 0)))
    if not frames:
        return []
    index = np.linspace(0, len(frames) - 1, min(count, len(frames)) + 2)[1:-1] if len(frames) > count else range(len(frames))
    return [frames[int(round(i))] for i in index]


def face_box(report: dict[str, Any], frame: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A square (x0, y0, x1, y1) around the dubbed face at `frame`: the box of the face whose frames
    hold it (else the nearest face's), widened by BOX_MARGIN and kept inside the frame."""
    faces = [f for f in report.get("faces") or [] if f.get("box")]
    if not faces:
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2
    holding = [f for f in faces if any(a <= frame < b for a, b in f.get("frames", []))]
    face = (holding or sorted(faces, key=lambda f: abs(int(f.get("box_frame", 0)) - frame)))[0]
    x0, y0, x1, y1 = face["box"]
    side = min(max(x1 - x0, y1 - y0) * BOX_MARGIN, width, height)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + int(side), top + int(side)


def read_frames(video: str, numbers: list[int]) -> dict[int, np.ndarray]:
    """Full-resolution RGB frames by frame number (decode order = presentation order here)."""
    import av

    from stages.media import rgb_view

    wanted, found = set(numbers), {}
    with av.open(video) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number in wanted:
                found[number] = np.array(rgb_view(frame, None))
            if len(found) == len(wanted):
                break
    return found


def _label(image: np.ndarray, text: str, x: int, y: int, scale: float = 0.45) -> None:
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), 1, cv2.LINE_AA)


def render_sheet(source: str, dubbed: Dubbed, count: int = 8, title: str = "") -> np.ndarray:
    """The sheet as an RGB image: a title line, then rows source | dubbed of `count` face tiles."""
    numbers = pick_frames(dubbed.report, count)
    if not numbers:
        raise ValueError("the film has no frames")
    before, after = read_frames(source, numbers), read_frames(dubbed.video, numbers)
    numbers = [n for n in numbers if n in before and n in after]
    step = float(dubbed.report.get("duration") or 0) / max(1, int(dubbed.report.get("frames") or 1))
    title_h = HEADER_H if title else 0
    sheet = np.full((title_h + 2 * (HEADER_H + TILE), LABEL_W + len(numbers) * TILE, 3), 255, np.uint8)
    if title:
        _label(sheet, title, 6, 16, 0.5)
    for row, (name, frames) in enumerate((("source", before), ("dubbed", after))):
        top = title_h + row * (HEADER_H + TILE)
        _label(sheet, name, 6, top + HEADER_H + TILE // 2)
        for column, number in enumerate(numbers):
            image = frames[number]
            x0, y0, x1, y1 = face_box(dubbed.report, number, image.shape[1], image.shape[0])
            tile = cv2.resize(image[y0:y1, x0:x1], (TILE, TILE), interpolation=cv2.INTER_AREA)
            left = LABEL_W + column * TILE
            sheet[top + HEADER_H : top + HEADER_H + TILE, left : left + TILE] = tile
            seconds = number * step
            _label(sheet, f"#{number}  {int(seconds // 60):02d}:{seconds % 60:05.2f}", left + 4, top + 16, 0.4)
    return sheet


def still_sheet(
    source: str, dub: str, out: str, model: str = "", dubbed: str = "", report: str = "", frames: int = 8
) -> np.ndarray:
    """Write the sheet of `model` dubbing `source` with `dub` (or of the already `dubbed` film) to `out`."""
    with tempfile.TemporaryDirectory(prefix="stabledub-sheet-") as work:
        if dubbed:
            if report:
                with open(report) as f:
                    found = Dubbed(dubbed, json.load(f))
            else:  # the face tracks and speaker choice of the pipeline, from a run that changes nothing
                found = Dubbed(dubbed, dub_film("identity", source, dub, work).report)
            title = f"{os.path.basename(dubbed)} (already dubbed) | source {os.path.basename(source)}"
        else:
            found = dub_film(model, source, dub, work)
            title = f"model {os.path.basename(model.rstrip('/'))} | {os.path.basename(source)} + {os.path.basename(dub)}"
        sheet = render_sheet(source, found, frames, title)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if not cv2.imwrite(out, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {out}")
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.still_sheet", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="MODEL SOURCE_VIDEO DUB_AUDIO OUT.png (with --dubbed: no MODEL)")
    parser.add_argument("--frames", type=int, default=8, help="tiles per row")
    parser.add_argument("--dubbed", default="", help="an already-dubbed film of SOURCE_VIDEO instead of a model")
    parser.add_argument("--report", default="", help="with --dubbed: its film report (<key>.json of the run)")
    args = parser.parse_args(argv)
    want = 3 if args.dubbed else 4
    if len(args.inputs) != want:
        parser.error(f"expected {'SOURCE_VIDEO DUB_AUDIO OUT.png' if args.dubbed else 'MODEL SOURCE_VIDEO DUB_AUDIO OUT.png'}")
    model, (source, dub, out) = ("" if args.dubbed else args.inputs[0]), args.inputs[-3:]
    for path in (source, dub, args.dubbed, args.report):
        if path and not os.path.isfile(path):
            parser.error(f"{path} is not a file")
    if args.frames < 1:
        parser.error("--frames must be at least 1")
    still_sheet(source, dub, out, model=model, dubbed=args.dubbed, report=args.report, frames=args.frames)
    print(f"still sheet: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
