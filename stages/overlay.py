"""Debug overlays: what the face track stage decided, drawn onto a full-resolution frame.

Per track present in the frame: the aligned crop's outline (shows scale and roll), the landmarks,
the union mask (tinted) and fine mask (outline), occluders (red), and a label with the track id,
whether it is dubbed (the chosen speaker, green) or why not, its speech-sync score and yaw.
"""

from __future__ import annotations

from fractions import Fraction

import cv2
import numpy as np

from models.face_landmarks import LIPS_OUTER, LOWER_OVAL, RIGID
from stages.face_align import apply_affine, invert
from stages.schema import Segment, Track

SPEAKER = (40, 220, 60)  # RGB
OTHER = (240, 200, 40)
SKIPPED = (150, 150, 150)
OCCLUDER = (230, 40, 40)


def _warp_to_frame(values: np.ndarray, affine: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Crop-space values into the frame-space box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    to_box = invert(affine)
    to_box[:, 2] -= (x0, y0)
    return cv2.warpAffine(values, to_box, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderValue=0)


def _label(track: Track) -> str:
    if track.speaking:
        state = "SPEAKER"
    else:
        state = track.info.get("skipped", "not speaking")
    sync = track.info.get("sync")
    parts = [f"#{track.track_id} {state}"]
    if sync is not None:
        parts.append(f"sync {sync:+.2f}")
    if "yaw" in track.info:
        parts.append(f"yaw {track.info['yaw']:+.0f}")
    return "  ".join(parts)


def draw_track(image: np.ndarray, track: Track, i: int) -> None:
    """Draw entry `i` of `track` onto `image` (full-resolution RGB, modified in place)."""
    colour = SPEAKER if track.speaking else (SKIPPED if "skipped" in track.info else OTHER)
    size = track.mask.shape[1]
    affine = track.affine[i]
    corners = apply_affine(invert(affine), np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64))
    h, w = image.shape[:2]
    x0, y0 = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, [w, h])
    x1, y1 = np.clip(np.ceil(corners.max(axis=0)).astype(int), 0, [w, h])
    thickness = max(1, int(round(max(h, w) / 640)))
    if x1 > x0 and y1 > y0:
        roi = image[y0:y1, x0:x1]
        union = _warp_to_frame(track.mask[i], affine, (x0, y0, x1, y1)).astype(np.float32)[..., None] / 255.0
        roi[:] = np.clip(roi * (1 - 0.35 * union) + np.array(colour, np.float32) * 0.35 * union, 0, 255).astype(np.uint8)
        if track.occlusion is not None:
            occluder = _warp_to_frame(track.occlusion[i], affine, (x0, y0, x1, y1)).astype(np.float32)[..., None] / 255.0
            roi[:] = np.clip(roi * (1 - 0.5 * occluder) + np.array(OCCLUDER, np.float32) * 0.5 * occluder, 0, 255).astype(
                np.uint8
            )
        if track.fine_mask is not None:
            fine = _warp_to_frame(track.fine_mask[i], affine, (x0, y0, x1, y1))
            contours, _ = cv2.findContours((fine >= 128).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(roi, contours, -1, colour, thickness)
    cv2.polylines(image, [np.round(corners).astype(np.int32)], True, colour, thickness, cv2.LINE_AA)
    if track.landmarks is not None:
        radius = max(1, thickness // 2)
        points = track.landmarks[i].astype(np.float64)
        if np.ptp(corners[:, 0]) < 300:  # a small face: the full mesh would be a blot
            points = points[np.concatenate([LOWER_OVAL, LIPS_OUTER, RIGID])]
        for x, y in apply_affine(invert(affine), points):
            cv2.circle(image, (int(round(x)), int(round(y))), radius, colour, -1)
    scale = 0.5 * thickness
    (text_w, _), _ = cv2.getTextSize(_label(track), cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    left = int(np.clip(corners[:, 0].min(), 0, max(0, w - text_w)))
    anchor = (left, int(max(14 * thickness, corners[:, 1].min() - 6)))
    cv2.putText(image, _label(track), anchor, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3 * thickness, cv2.LINE_AA)
    cv2.putText(image, _label(track), anchor, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)


def draw_overlay(frame: np.ndarray, segment: Segment, frame_index: int) -> np.ndarray:
    """A copy of `frame` (full-resolution RGB at `segment` frame `frame_index`, context frames
    included in the count) with every track present in that frame drawn on."""
    image = frame.copy()
    for track in segment.tracks:
        where = np.nonzero(track.frame_index == frame_index)[0]
        if len(where):
            draw_track(image, track, int(where[0]))
    return image


def debug_paths(path: str) -> tuple[str, str]:
    """Where a segment file's debug video and still go: `x.mp4` -> `x.debug.mp4`, `x.debug.png`."""
    stem = path[:-4] if path.endswith(".mp4") else path
    return stem + ".debug.mp4", stem + ".debug.png"


class DebugWriter:
    """Writes a segment's frames with overlays to `<segment>.debug.mp4` (at most `max_side` pixels,
    the same size for every segment of a film so the assembler can concatenate them) and the middle
    frame to `<segment>.debug.png`."""

    def __init__(self, path: str, segment: Segment, rate: Fraction, max_side: int = 1280) -> None:
        import av

        self.segment = segment
        self.video_path, self.still_path = debug_paths(path)
        scale = min(1.0, max_side / max(segment.width, segment.height))
        self.size = (max(2, int(segment.width * scale) // 2 * 2), max(2, int(segment.height * scale) // 2 * 2))
        self._still_index = segment.context + (segment.stop - segment.start) // 2
        self._output = av.open(self.video_path, mode="w", format="mp4")
        self._stream = self._output.add_stream("libx264", rate=rate, options={"crf": "23", "preset": "veryfast", "bf": "0"})
        self._stream.width, self._stream.height = self.size
        self._stream.pix_fmt = "yuv420p"
        self._stream.time_base = Fraction(*segment.time_base)
        self._stream.codec_context.time_base = Fraction(*segment.time_base)

    def add(self, frame_index: int, image: np.ndarray, pts: int) -> None:
        import av

        drawn = draw_overlay(image, self.segment, frame_index)
        if frame_index == self._still_index:
            cv2.imwrite(self.still_path, cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        small = cv2.resize(drawn, self.size, interpolation=cv2.INTER_AREA)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(small), format="rgb24")
        frame.pts = pts
        frame.time_base = self._stream.time_base
        for packet in self._stream.encode(frame):
            self._output.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode(None):
            self._output.mux(packet)
        self._output.close()
