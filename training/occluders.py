"""Synthetic occluders pasted over the mouth of aligned face crops, with their ground-truth masks.

One compositor serves two trainings: the occlusion segmenter (training/occlusion.py) learns to
find occluders from these composites, and the inpainting model's occlusion-aware training uses the
same composites so it learns to keep occluders in front of the mouth it regenerates.

`composite_occluders(crops, masks, rng)` takes a batch of aligned crops (N, S, S, 3) uint8 with their
lower-face masks (N, S, S) uint8 and returns the composited crops and the occluder alpha (the ground
truth) as uint8 0..255. With `sequence=True` the batch is consecutive frames of one track and a single
occluder moves slowly across it; otherwise every crop gets its own occluder. Everything is placed in
units of the mouth region's size, measured from the mask, so crop size and alignment do not matter.

Kinds: hands, single fingers (with a fist below), microphones (shaded sphere heads with grille, foam
or plain finish on a shaded cylinder body), cups, hair locks and plain handheld objects. Style sets
(`TRAIN_STYLES`, `HELDOUT_STYLES`) draw from disjoint colours, grille pitches, finger counts and cup
shapes, so an evaluation can hold out styles as well as seeds and clips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

RGB = tuple[int, int, int]
KINDS = ("hand", "finger", "microphone", "cup", "hair", "object")


@dataclass(frozen=True)
class OccluderStyles:
    """The ranges occluders are drawn from. Two instances with disjoint ranges give a style hold-out."""

    name: str
    kind_weights: tuple[tuple[str, float], ...]
    skin_tones: tuple[RGB, ...]
    object_colours: tuple[RGB, ...]
    hair_colours: tuple[RGB, ...]
    mic_heads: tuple[str, ...]  # grille, foam, plain
    grille_pitch: tuple[float, float]  # mesh period in mouth units
    finger_counts: tuple[int, ...]  # fingers of an open hand (the thumb is extra)
    cup_shapes: tuple[str, ...]  # mug, paper, tumbler
    face_coloured_hands: float = 0.35  # fraction of hands/fingers in the face's own skin colour


TRAIN_STYLES = OccluderStyles(
    name="train",
    kind_weights=(("hand", 0.22), ("finger", 0.14), ("microphone", 0.3), ("cup", 0.12), ("hair", 0.12), ("object", 0.1)),
    skin_tones=((241, 194, 167), (224, 172, 138), (198, 134, 96), (160, 106, 72), (118, 76, 52), (86, 56, 40), (232, 190, 160)),
    object_colours=((20, 20, 22), (60, 60, 64), (180, 182, 186), (235, 235, 230), (170, 30, 35), (30, 50, 120), (40, 40, 40)),
    hair_colours=((25, 20, 18), (60, 40, 28), (100, 70, 45), (120, 60, 35)),
    mic_heads=("grille", "foam", "plain"),
    grille_pitch=(0.09, 0.2),
    finger_counts=(4,),
    cup_shapes=("mug", "paper"),
)

HELDOUT_STYLES = OccluderStyles(
    name="heldout",
    kind_weights=(("hand", 0.22), ("finger", 0.14), ("microphone", 0.3), ("cup", 0.12), ("hair", 0.12), ("object", 0.1)),
    skin_tones=((250, 214, 190), (210, 150, 115), (140, 90, 62), (100, 66, 46)),
    object_colours=((200, 160, 60), (40, 120, 60), (110, 50, 140), (230, 120, 30), (20, 130, 140), (220, 120, 160)),
    hair_colours=((200, 170, 110), (150, 150, 150), (165, 80, 40), (140, 105, 70)),
    mic_heads=("grille", "foam"),
    grille_pitch=(0.22, 0.3),
    finger_counts=(2, 3),
    cup_shapes=("tumbler",),
)


@dataclass
class Sprite:
    """An occluder drawn once in its own frame: colour premultiplied by alpha, and the point placed
    on the target (`anchor`, sprite pixels)."""

    rgba: np.ndarray  # (h, w, 4) float32: premultiplied RGB in 0..1, alpha in 0..1
    anchor: tuple[float, float]
    kind: str


@dataclass
class Composite:
    crops: np.ndarray  # (N, S, S, 3) uint8 crops with occluders
    occlusion: np.ndarray  # (N, S, S) uint8 0..255 occluder alpha (ground truth)
    kinds: list[str] = field(default_factory=list)  # per crop: the occluder kind, "" when clean


@dataclass(frozen=True)
class MouthFrame:
    """Where the mouth region of one crop is: its centre and size (pixels)."""

    cx: float
    cy: float
    unit: float  # about the mouth's half-width; every occluder dimension is a multiple of it


def mouth_frame(mask: np.ndarray) -> MouthFrame:
    """Centre and scale of the region to regenerate; a crop without one gets the crop's lower middle."""
    ys, xs = np.nonzero(mask > 127)
    size = mask.shape[0]
    if len(xs) < 16:
        return MouthFrame(size / 2, size * 0.62, size * 0.13)
    half_width = (xs.max() - xs.min() + 1) / 2
    # the region spans the lower face cheek to cheek: about 2.5 mouth half-widths
    return MouthFrame(float(xs.mean()), float(ys.mean()), float(half_width) / 2.5)


# ----------------------------------------------------------------------------------------------
# Shading helpers


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _light(rng: np.random.Generator) -> np.ndarray:
    """A key light from the front, tilted up to ~60 degrees in a random direction."""
    tilt, turn = rng.uniform(0.2, 1.0), rng.uniform(0, 2 * np.pi)
    return _unit(np.array([np.cos(turn) * np.sin(tilt), np.sin(turn) * np.sin(tilt), np.cos(tilt)]))


def _relief_normals(shape: np.ndarray, radius: float) -> np.ndarray:
    """Normals (h, w, 3) of a shape whose edges round off like a cylinder of `radius` pixels."""
    distance = cv2.distanceTransform(shape, cv2.DIST_L2, 5)
    r = max(radius, 1.0)
    h = np.clip(distance / r, 0.0, 1.0)
    z = np.sqrt(np.clip(1.0 - (1.0 - h) ** 2, 0.0, 1.0)) * r
    z = cv2.GaussianBlur(z, (0, 0), 0.8)
    gx = cv2.Sobel(z, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(z, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    n = np.dstack([-gx, -gy, np.ones_like(z)])
    return n / np.linalg.norm(n, axis=2, keepdims=True)


def _shade(
    normals: np.ndarray,
    base: np.ndarray,
    light: np.ndarray,
    rng: np.random.Generator,
    gloss: float,
    ambient: float | None = None,
) -> np.ndarray:
    """Lambert + Blinn-Phong shading of a base colour (h, w, 3 or 3,) in 0..1."""
    ambient = rng.uniform(0.25, 0.45) if ambient is None else ambient
    diffuse = np.clip(normals @ light, 0.0, 1.0)[..., None]
    half = _unit(light + np.array([0.0, 0.0, 1.0]))
    power = rng.uniform(12, 60)
    specular = (np.clip(normals @ half, 0.0, 1.0) ** power)[..., None]
    return np.clip(base * (ambient + (1.0 - ambient) * diffuse) + gloss * specular, 0.0, 1.0)


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth noise in about -1..1 with features `scale` pixels wide."""
    h, w = shape
    small = rng.standard_normal((max(2, int(h / scale) + 2), max(2, int(w / scale) + 2))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _colour(rng: np.random.Generator, palette: tuple[RGB, ...], jitter: float = 0.06) -> np.ndarray:
    base = np.array(palette[rng.integers(len(palette))], np.float32) / 255.0
    return np.clip(base * rng.uniform(1 - jitter * 2, 1 + jitter * 2) + rng.normal(0, jitter, 3), 0.0, 1.0)


def _canvas(width: float, height: float) -> tuple[np.ndarray, int, int]:
    w, h = int(np.ceil(width)), int(np.ceil(height))
    return np.zeros((h, w), np.uint8), w, h


def _sprite(colour: np.ndarray, alpha: np.ndarray, anchor: tuple[float, float], kind: str) -> Sprite:
    alpha = np.clip(alpha.astype(np.float32), 0.0, 1.0)
    rgba = np.dstack([colour.astype(np.float32) * alpha[..., None], alpha])
    return Sprite(rgba, anchor, kind)


def _aa(shape: np.ndarray) -> np.ndarray:
    """Anti-aliased alpha from a binary drawing."""
    return cv2.GaussianBlur(shape.astype(np.float32) / 255.0, (0, 0), 0.7)


def _capsule(img: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], width: float, value: int = 255) -> None:
    cv2.line(
        img,
        (int(round(p0[0])), int(round(p0[1]))),
        (int(round(p1[0])), int(round(p1[1]))),
        value,
        max(1, int(round(width))),
        cv2.LINE_AA,
    )


# ----------------------------------------------------------------------------------------------
# Occluder kinds: each draws one sprite in its own frame, sized in mouth units `u`.


def _skin(rng: np.random.Generator, styles: OccluderStyles, face_skin: np.ndarray) -> np.ndarray:
    if rng.random() < styles.face_coloured_hands:
        return np.clip(face_skin * rng.uniform(0.85, 1.1) + rng.normal(0, 0.03, 3), 0, 1)
    return _colour(rng, styles.skin_tones, 0.04)


def _skin_texture(rng: np.random.Generator, shape: tuple[int, int], u: float) -> np.ndarray:
    return 1.0 + 0.04 * _noise(rng, shape, u * 0.3) + 0.02 * rng.standard_normal(shape).astype(np.float32)


def draw_hand(rng: np.random.Generator, u: float, styles: OccluderStyles, face_skin: np.ndarray) -> Sprite:
    """An open hand: palm, fingers (spread or together), a thumb; fingers point up in its frame."""
    scale = rng.uniform(0.9, 1.35) * u
    palm_w, palm_h = 1.7 * scale, 1.6 * scale
    shape, w, h = _canvas(palm_w * 3.0, palm_h * 3.4)
    cx, cy = w / 2, h * 0.62
    cv2.ellipse(shape, (int(cx), int(cy)), (int(palm_w / 2), int(palm_h / 2)), 0, 0, 360, 255, -1, cv2.LINE_AA)
    count = int(rng.choice(styles.finger_counts))
    finger_w = palm_w / 4.2 * rng.uniform(0.85, 1.1)
    spread = rng.uniform(0.0, 0.25)
    tips: list[tuple[float, float]] = []
    lengths = np.array([0.9, 1.0, 0.95, 0.75])[:count] if count <= 4 else np.full(count, 0.9)
    offsets = np.linspace(-(count - 1) / 2, (count - 1) / 2, count) * finger_w * 1.02
    for k in range(count):
        angle = offsets[k] / max(finger_w, 1) * spread - np.pi / 2
        length = lengths[k] * palm_h * rng.uniform(0.75, 1.15) * (rng.uniform(0.4, 0.7) if rng.random() < 0.15 else 1)
        base = (cx + offsets[k], cy - palm_h * 0.3)
        tip = (base[0] + np.cos(angle) * length, base[1] + np.sin(angle) * length)
        _capsule(shape, base, tip, finger_w)
        tips.append(tip)
    side = 1 if rng.random() < 0.5 else -1
    thumb_base = (cx + side * palm_w * 0.4, cy + palm_h * 0.1)
    thumb_angle = -np.pi / 2 + side * rng.uniform(0.5, 1.2)
    thumb_len = palm_h * rng.uniform(0.55, 0.8)
    thumb_tip = (thumb_base[0] + np.cos(thumb_angle) * thumb_len, thumb_base[1] + np.sin(thumb_angle) * thumb_len)
    _capsule(shape, thumb_base, thumb_tip, finger_w * 1.1)
    _capsule(shape, (cx, cy + palm_h * 0.3), (cx, h - 1), palm_w * 0.75)  # wrist out of frame
    normals = _relief_normals(shape, finger_w * 0.5)
    skin = _skin(rng, styles, face_skin)
    colour = _shade(
        normals, skin[None, None] * _skin_texture(rng, shape.shape, u)[..., None], _light(rng), rng, rng.uniform(0.02, 0.12)
    )
    creases = np.zeros_like(shape)
    for k in range(count - 1):  # dark gaps where fingers touch
        x = cx + (offsets[k] + offsets[k + 1]) / 2
        cv2.line(creases, (int(x), int(cy - palm_h * 0.3)), (int(x), int(cy - palm_h * 0.3 - palm_h * 0.7)), 255, 1, cv2.LINE_AA)
    for tip in tips:  # nails
        cv2.ellipse(
            creases,
            (int(tip[0]), int(tip[1] + finger_w * 0.35)),
            (int(finger_w * 0.28), int(finger_w * 0.35)),
            0,
            0,
            360,
            96,
            1,
            cv2.LINE_AA,
        )
    colour *= 1.0 - 0.35 * (creases.astype(np.float32) / 255.0)[..., None]
    return _sprite(colour, _aa(shape), (cx, cy - palm_h * 0.2), "hand")


def draw_finger(rng: np.random.Generator, u: float, styles: OccluderStyles, face_skin: np.ndarray) -> Sprite:
    """One or two raised fingers from a fist: the "shh" pose; the fingertip is the anchor."""
    finger_w = u * rng.uniform(0.38, 0.55)
    length = u * rng.uniform(1.8, 2.8)
    fist_w, fist_h = finger_w * rng.uniform(3.4, 4.2), finger_w * rng.uniform(2.6, 3.2)
    shape, w, h = _canvas(fist_w * 2.2, length + fist_h * 2.4)
    cx = w / 2
    tip_y = finger_w
    count = 1 if rng.random() < 0.7 else 2
    tips = []
    for k in range(count):
        x = cx + (k - (count - 1) / 2) * finger_w * 1.05
        _capsule(shape, (x, tip_y + finger_w / 2), (x, tip_y + length), finger_w)
        tips.append(x)
    fist_top = tip_y + length - finger_w * 0.3
    cv2.ellipse(
        shape,
        (int(cx + fist_w * 0.1), int(fist_top + fist_h / 2)),
        (int(fist_w / 2), int(fist_h / 2)),
        0,
        0,
        360,
        255,
        -1,
        cv2.LINE_AA,
    )
    _capsule(shape, (cx, fist_top + fist_h * 0.5), (cx, h - 1), fist_w * 0.7)
    normals = _relief_normals(shape, finger_w * 0.5)
    skin = _skin(rng, styles, face_skin)
    colour = _shade(
        normals, skin[None, None] * _skin_texture(rng, shape.shape, u)[..., None], _light(rng), rng, rng.uniform(0.02, 0.12)
    )
    marks = np.zeros_like(shape)
    for x in tips:
        cv2.ellipse(
            marks,
            (int(x), int(tip_y + finger_w * 0.45)),
            (int(finger_w * 0.3), int(finger_w * 0.38)),
            0,
            0,
            360,
            110,
            1,
            cv2.LINE_AA,
        )
    for k in range(3):  # knuckles of the folded fingers
        y = fist_top + fist_h * (0.3 + 0.2 * k)
        cv2.line(marks, (int(cx - fist_w * 0.3), int(y)), (int(cx + fist_w * 0.35), int(y)), 120, 1, cv2.LINE_AA)
    colour *= 1.0 - 0.3 * (marks.astype(np.float32) / 255.0)[..., None]
    return _sprite(colour, _aa(shape), (tips[0], tip_y + finger_w * 0.6), "finger")


def _mic_head_colour(
    rng: np.random.Generator, styles: OccluderStyles, finish: str, radius: float, light: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Colour and alpha of a spherical microphone head of `radius` pixels, centred in its square."""
    size = int(np.ceil(radius * 2 + 6))
    c = size / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    x, y = (xx - c) / radius, (yy - c) / radius
    r2 = x * x + y * y
    z = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    normals = np.dstack([x, y, z])
    normals /= np.linalg.norm(normals, axis=2, keepdims=True) + 1e-6
    if finish == "foam":
        edge = 1.0 + 0.06 * _noise(rng, (size, size), radius * 0.25)  # fuzzy silhouette
        alpha = np.clip((edge - np.sqrt(r2)) * radius * 0.8, 0.0, 1.0)
        base = _colour(rng, ((18, 18, 20), (30, 30, 34), (25, 25, 28)) + styles.object_colours[:2], 0.03)
        texture = 1.0 + 0.15 * _noise(rng, (size, size), 2.5) + 0.1 * rng.standard_normal((size, size)).astype(np.float32)
        colour = _shade(normals, base[None, None] * texture[..., None], light, rng, 0.02, ambient=0.5)
        return colour, alpha
    alpha = np.clip((1.0 - np.sqrt(r2)) * radius + 0.5, 0.0, 1.0)
    metal = _colour(rng, ((190, 190, 195), (120, 120, 125), (40, 40, 44)) + styles.object_colours, 0.05)
    if finish == "plain":
        colour = _shade(normals, metal[None, None], light, rng, rng.uniform(0.2, 0.6))
        return colour, alpha
    # grille: a wire mesh on the sphere (lines of latitude and longitude), dark inside the holes
    period = rng.uniform(*styles.grille_pitch) * radius / 1.1
    turn = rng.uniform(0, np.pi)
    lon = np.arctan2(x * np.cos(turn) - y * np.sin(turn), z + 1e-3) * radius
    lat = np.arcsin(np.clip(x * np.sin(turn) + y * np.cos(turn), -1, 1)) * radius
    wire = rng.uniform(0.18, 0.35)
    mesh = ((np.abs((lon / period) % 1.0 - 0.5) > 0.5 - wire) | (np.abs((lat / period) % 1.0 - 0.5) > 0.5 - wire)).astype(
        np.float32
    )
    mesh = cv2.GaussianBlur(mesh, (0, 0), 0.6)
    hole = metal * rng.uniform(0.08, 0.25)
    base = mesh[..., None] * metal + (1.0 - mesh[..., None]) * hole
    colour = _shade(normals, base, light, rng, rng.uniform(0.2, 0.5) * mesh[..., None])
    return colour, alpha


def draw_microphone(rng: np.random.Generator, u: float, styles: OccluderStyles, face_skin: np.ndarray) -> Sprite:
    """A handheld or stand microphone: a ball head on a tapered cylinder body going down."""
    radius = u * rng.uniform(0.7, 1.5)
    finish = str(rng.choice(styles.mic_heads))
    light = _light(rng)
    head, head_alpha = _mic_head_colour(rng, styles, finish, radius, light)
    body_len = radius * rng.uniform(2.0, 4.5)
    top_w, bottom_w = radius * rng.uniform(0.6, 0.95), radius * rng.uniform(0.35, 0.6)
    hs = head.shape[0]
    width = int(max(hs, top_w * 2) + 4)
    height = int(hs / 2 + body_len + 4)
    shape = np.zeros((height, width), np.uint8)
    cx, cy = width / 2, hs / 2 + 2
    body = np.array(
        [
            [cx - top_w / 2, cy + radius * 0.6],
            [cx + top_w / 2, cy + radius * 0.6],
            [cx + bottom_w / 2, cy + body_len],
            [cx - bottom_w / 2, cy + body_len],
        ]
    )
    cv2.fillPoly(shape, [np.round(body).astype(np.int32)], 255, cv2.LINE_AA)
    normals = _relief_normals(shape, top_w * 0.5)
    body_colour = _colour(rng, ((20, 20, 22), (50, 50, 54), (170, 172, 176)) + styles.object_colours, 0.04)
    colour = _shade(normals, body_colour[None, None], light, rng, rng.uniform(0.2, 0.7))
    if rng.random() < 0.5:  # a metal ring between head and body
        ring_y = int(cy + radius * rng.uniform(0.75, 0.95))
        colour[ring_y : ring_y + max(2, int(radius * 0.12))] *= rng.uniform(1.3, 2.0)
    alpha = _aa(shape)
    x0, y0 = int(round(cx - hs / 2)), int(round(cy - hs / 2))
    region = (slice(max(0, y0), y0 + hs), slice(max(0, x0), x0 + hs))
    sub_h, sub_w = colour[region].shape[:2]
    ha = head_alpha[:sub_h, :sub_w, None]
    colour[region] = head[:sub_h, :sub_w] * ha + colour[region] * (1.0 - ha)
    alpha[region] = np.maximum(alpha[region], head_alpha[:sub_h, :sub_w])
    return _sprite(np.clip(colour, 0, 1), alpha, (cx, cy), "microphone")


def draw_cup(rng: np.random.Generator, u: float, styles: OccluderStyles, face_skin: np.ndarray) -> Sprite:
    """A mug, paper cup or tumbler seen from the side, raised to the mouth (rim is the anchor)."""
    shape_name = str(rng.choice(styles.cup_shapes))
    top_w = u * rng.uniform(2.0, 3.0)
    height = top_w * rng.uniform(1.0, 1.5)
    bottom_w = top_w * (rng.uniform(0.65, 0.8) if shape_name == "paper" else rng.uniform(0.9, 1.0))
    handle = shape_name == "mug"
    shape, w, h = _canvas(top_w * (1.8 if handle else 1.2), height * 1.25)
    cx, top = w / 2 - (top_w * 0.2 if handle else 0), h * 0.08
    rim_h = top_w * rng.uniform(0.08, 0.16)
    body = np.array(
        [[cx - top_w / 2, top], [cx + top_w / 2, top], [cx + bottom_w / 2, top + height], [cx - bottom_w / 2, top + height]]
    )
    cv2.fillPoly(shape, [np.round(body).astype(np.int32)], 255, cv2.LINE_AA)
    cv2.ellipse(shape, (int(cx), int(top)), (int(top_w / 2), int(rim_h)), 0, 0, 360, 255, -1, cv2.LINE_AA)
    cv2.ellipse(shape, (int(cx), int(top + height)), (int(bottom_w / 2), int(rim_h * 0.8)), 0, 0, 180, 255, -1, cv2.LINE_AA)
    if handle:
        cv2.ellipse(
            shape,
            (int(cx + top_w / 2), int(top + height * 0.45)),
            (int(top_w * 0.28), int(height * 0.28)),
            0,
            -90,
            90,
            255,
            max(2, int(top_w * 0.1)),
            cv2.LINE_AA,
        )
    normals = _relief_normals(shape, top_w * 0.45)
    base = _colour(rng, styles.object_colours, 0.05)
    colour_map = np.broadcast_to(base, shape.shape + (3,)).copy()
    if rng.random() < 0.6:  # a printed band or a lid band in another colour
        y0 = int(top + height * rng.uniform(0.0 if shape_name == "paper" else 0.3, 0.5))
        colour_map[y0 : y0 + int(height * rng.uniform(0.1, 0.3))] = _colour(rng, styles.object_colours, 0.05)
    colour = _shade(normals, colour_map, _light(rng), rng, rng.uniform(0.1, 0.6))
    opening = np.zeros_like(shape)
    cv2.ellipse(opening, (int(cx), int(top)), (int(top_w / 2 * 0.92), int(rim_h * 0.75)), 0, 0, 360, 255, -1, cv2.LINE_AA)
    colour *= 1.0 - 0.5 * (opening.astype(np.float32) / 255.0)[..., None]
    return _sprite(colour, _aa(shape), (cx, top + height * 0.2), "cup")


def draw_hair(rng: np.random.Generator, u: float, styles: OccluderStyles, face_skin: np.ndarray) -> Sprite:
    """A lock of hair: many thin curved strands hanging across the mouth, frayed at the edges."""
    span = u * rng.uniform(4.0, 6.0)
    lock_w = u * rng.uniform(0.5, 1.4)
    bend = rng.uniform(-1.2, 1.2) * u
    _, w, h = _canvas(lock_w * 3 + abs(bend) * 2 + u, span)
    colour_sum = np.zeros((h, w, 3), np.float32)
    weight = np.zeros((h, w), np.float32)
    alpha = np.zeros((h, w), np.float32)
    base = _colour(rng, styles.hair_colours, 0.04)
    t = np.linspace(0, 1, 24)[:, None]
    for _ in range(int(rng.integers(4, 7))):  # strands in a few tint groups: one drawing per group
        strands = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(6, 14))):
            offset = rng.normal(0, lock_w / 2.5)
            wiggle = rng.normal(0, u * 0.15)
            p0 = np.array([w / 2 + offset, 0.0])
            p1 = np.array([w / 2 + offset * 0.6 + bend + wiggle, span / 2])
            p2 = np.array([w / 2 + offset * rng.uniform(0.8, 1.6) + bend * 0.4, span - 1])
            points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
            cv2.polylines(
                strands,
                [np.round(points).astype(np.int32)],
                False,
                255,
                max(1, int(round(u * rng.uniform(0.03, 0.1)))),
                cv2.LINE_AA,
            )
        a = strands.astype(np.float32) / 255.0 * rng.uniform(0.8, 1.0)
        colour_sum += a[..., None] * np.clip(base * rng.uniform(0.7, 1.35), 0, 1)
        weight += a
        alpha = np.maximum(alpha, a)
    colour = colour_sum / np.maximum(weight, 1e-3)[..., None]  # mean tint of overlapping strands
    sheen = 1.0 + 0.25 * np.clip(_noise(rng, (h, w), u * 0.5), 0, None)
    return _sprite(np.clip(colour * sheen[..., None], 0, 1), alpha, (w / 2 + bend * 0.6, span / 2), "hair")


def draw_object(rng: np.random.Generator, u: float, styles: OccluderStyles, face_skin: np.ndarray) -> Sprite:
    """A plain handheld object (phone, pen, card, pencil): a rounded bar or slab, shaded."""
    long = u * rng.uniform(1.5, 4.5)
    thick = u * (rng.uniform(0.15, 0.4) if rng.random() < 0.5 else rng.uniform(0.6, 1.4))
    shape, w, h = _canvas(thick + 8, long + 8)
    corner = int(min(thick, long) * rng.uniform(0.1, 0.5))
    x0, y0, x1, y1 = 4, 4, int(4 + thick), int(4 + long)
    cv2.rectangle(shape, (x0 + corner, y0), (x1 - corner, y1), 255, -1)
    cv2.rectangle(shape, (x0, y0 + corner), (x1, y1 - corner), 255, -1)
    for cx_, cy_ in (
        (x0 + corner, y0 + corner),
        (x1 - corner, y0 + corner),
        (x0 + corner, y1 - corner),
        (x1 - corner, y1 - corner),
    ):
        cv2.circle(shape, (cx_, cy_), corner, 255, -1, cv2.LINE_AA)
    normals = _relief_normals(shape, max(2.0, min(thick * 0.5, u * 0.3)))
    colour = _shade(normals, _colour(rng, styles.object_colours, 0.05)[None, None], _light(rng), rng, rng.uniform(0.1, 0.7))
    return _sprite(colour, _aa(shape), (w / 2, h * rng.uniform(0.2, 0.5)), "object")


DRAW: dict[str, Callable[[np.random.Generator, float, OccluderStyles, np.ndarray], Sprite]] = {
    "hand": draw_hand,
    "finger": draw_finger,
    "microphone": draw_microphone,
    "cup": draw_cup,
    "hair": draw_hair,
    "object": draw_object,
}


# ----------------------------------------------------------------------------------------------
# Placement, motion and compositing


@dataclass(frozen=True)
class Pose:
    """Where a sprite's anchor lands, relative to the mouth centre (mouth units), and its turn/size."""

    dx: float
    dy: float
    angle: float  # degrees, counter-clockwise on screen
    scale: float


def initial_pose(rng: np.random.Generator, kind: str) -> Pose:
    """A pose that puts the occluder over or next to the mouth, as people hold these things."""
    if kind == "microphone":
        return Pose(rng.uniform(-1.3, 1.3), rng.uniform(-0.3, 2.4), rng.normal(0, 30), 1.0)
    if kind == "hand":
        return Pose(rng.uniform(-1.5, 1.5), rng.uniform(-0.6, 1.8), rng.uniform(-120, 120), 1.0)
    if kind == "finger":
        return Pose(rng.uniform(-0.8, 0.8), rng.uniform(-1.2, 0.3), rng.normal(0, 25), 1.0)
    if kind == "cup":
        return Pose(rng.uniform(-1.2, 1.2), rng.uniform(-0.3, 1.5), rng.normal(0, 25), 1.0)
    if kind == "hair":
        return Pose(rng.uniform(-1.6, 1.6), rng.uniform(-0.5, 0.5), rng.normal(0, 20), 1.0)
    return Pose(rng.uniform(-1.2, 1.2), rng.uniform(-0.4, 1.6), rng.uniform(-90, 90), 1.0)


@dataclass(frozen=True)
class Motion:
    """Slow drift plus a gentle sway; `at(t)` gives the pose offset at frame t."""

    velocity: tuple[float, float, float, float]  # per frame: dx, dy (units), angle (deg), log scale
    sway: tuple[float, float, float]  # amplitude: units, degrees, log scale
    period: float  # frames
    phase: float

    def at(self, pose: Pose, t: float) -> Pose:
        s = np.sin(2 * np.pi * t / self.period + self.phase)
        c = np.cos(2 * np.pi * t / self.period * 0.7 + self.phase)
        vx, vy, va, vs = self.velocity
        return Pose(
            pose.dx + vx * t + self.sway[0] * s,
            pose.dy + vy * t + self.sway[0] * c,
            pose.angle + va * t + self.sway[1] * s,
            pose.scale * float(np.exp(vs * t + self.sway[2] * c)),
        )


def random_motion(rng: np.random.Generator) -> Motion:
    fast = rng.random() < 0.2
    speed = 0.05 if fast else 0.015
    return Motion(
        velocity=(rng.normal(0, speed), rng.normal(0, speed), rng.normal(0, 0.6 if fast else 0.2), rng.normal(0, 0.004)),
        sway=(rng.uniform(0, 0.15), rng.uniform(0, 4), rng.uniform(0, 0.03)),
        period=rng.uniform(20, 80),
        phase=rng.uniform(0, 2 * np.pi),
    )


@dataclass(frozen=True)
class Look:
    """Per-occluder rendering: focus blur, shadow on the face, brightness to match the scene."""

    blur: float  # mouth units
    shadow_offset: tuple[float, float]  # mouth units
    shadow_blur: float
    shadow_strength: float
    brightness: float


def random_look(rng: np.random.Generator) -> Look:
    turn = rng.uniform(0, 2 * np.pi)
    reach = rng.uniform(0.05, 0.35)
    return Look(
        blur=rng.choice([0.0, rng.uniform(0.0, 0.06)]) if rng.random() < 0.7 else rng.uniform(0.05, 0.12),
        shadow_offset=(np.cos(turn) * reach, np.sin(turn) * reach),
        shadow_blur=rng.uniform(0.1, 0.4),
        shadow_strength=rng.uniform(0.0, 0.55) if rng.random() < 0.7 else 0.0,
        brightness=rng.uniform(0.6, 1.15),
    )


def place(sprite: Sprite, pose: Pose, mouth: MouthFrame, size: int, motion_px: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The sprite warped into a crop of `size` (S, S, 4), with motion blur along `motion_px`."""
    ax, ay = sprite.anchor
    target = (mouth.cx + pose.dx * mouth.unit, mouth.cy + pose.dy * mouth.unit)
    matrix = cv2.getRotationMatrix2D((ax, ay), pose.angle, pose.scale)
    matrix[:, 2] += (target[0] - ax, target[1] - ay)
    layer = cv2.warpAffine(
        sprite.rgba, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    length = float(np.hypot(*motion_px))
    if length >= 1.5:
        k = int(np.ceil(length)) | 1
        kernel = np.zeros((k, k), np.float32)
        c = k // 2
        direction = np.array(motion_px) / length
        cv2.line(
            kernel,
            (int(round(c - direction[0] * c)), int(round(c - direction[1] * c))),
            (int(round(c + direction[0] * c)), int(round(c + direction[1] * c))),
            1.0,
            1,
        )
        layer = cv2.filter2D(layer, -1, kernel / kernel.sum())
    return layer


def blend(crop: np.ndarray, layer: np.ndarray, look: Look, unit: float) -> tuple[np.ndarray, np.ndarray]:
    """Crop with the occluder (and its shadow) over it, and the occluder's alpha (float32)."""
    if look.blur > 0:
        layer = cv2.GaussianBlur(layer, (0, 0), max(0.3, look.blur * unit))
    alpha = np.clip(layer[..., 3], 0.0, 1.0)
    face = crop.astype(np.float32) / 255.0
    if look.shadow_strength > 0:
        shift = np.float32([[1, 0, look.shadow_offset[0] * unit], [0, 1, look.shadow_offset[1] * unit]])
        shadow = cv2.warpAffine(alpha, shift, alpha.shape[::-1], borderValue=0)
        shadow = cv2.GaussianBlur(shadow, (0, 0), max(0.5, look.shadow_blur * unit))
        face *= (1.0 - look.shadow_strength * shadow)[..., None]
    colour = np.clip(layer[..., :3] * look.brightness, 0.0, 1.0)
    out = face * (1.0 - alpha[..., None]) + colour
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8), alpha


def face_skin_colour(crop: np.ndarray, mouth: MouthFrame) -> np.ndarray:
    """Median colour of the cheeks (beside and above the mouth): hands often match the face."""
    size = crop.shape[0]
    y0, y1 = int(np.clip(mouth.cy - 2.2 * mouth.unit, 0, size - 1)), int(np.clip(mouth.cy - 0.8 * mouth.unit, 1, size))
    x0, x1 = int(np.clip(mouth.cx - 2.0 * mouth.unit, 0, size - 1)), int(np.clip(mouth.cx + 2.0 * mouth.unit, 1, size))
    patch = crop[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)].reshape(-1, 3)
    return np.median(patch, axis=0).astype(np.float32) / 255.0


def pick_kind(rng: np.random.Generator, styles: OccluderStyles, kinds: tuple[str, ...] | None) -> str:
    names = [k for k, _ in styles.kind_weights if kinds is None or k in kinds]
    if not names:
        raise ValueError(f"no occluder kinds left from {kinds!r}; known: {KINDS}")
    weights = np.array([w for k, w in styles.kind_weights if k in names])
    return str(names[rng.choice(len(names), p=weights / weights.sum())])


def composite_occluders(
    crops: np.ndarray,
    masks: np.ndarray,
    rng: np.random.Generator,
    styles: OccluderStyles = TRAIN_STYLES,
    *,
    sequence: bool = False,
    clean_fraction: float = 0.0,
    kinds: tuple[str, ...] | None = None,
    extra_fraction: float = 0.1,
) -> Composite:
    """Paste synthetic occluders over the mouths of `crops` (N, S, S, 3) given their masks (N, S, S).

    `sequence`: the crops are consecutive frames of one track; one occluder (or none, with
    probability `clean_fraction`) moves slowly over all of them. Otherwise each crop independently
    gets an occluder or, with probability `clean_fraction`, stays clean. `extra_fraction` of the
    occluded crops (or sequences) get a second occluder of another kind. `kinds` restricts the kinds.
    """
    if crops.ndim != 4 or masks.shape != crops.shape[:3]:
        raise ValueError(f"crops (N, S, S, 3) and masks (N, S, S) expected, got {crops.shape} and {masks.shape}")
    n, size = len(crops), crops.shape[1]
    out = crops.copy()
    occlusion = np.zeros(masks.shape, np.uint8)
    labels = [""] * n
    groups = [np.arange(n)] if sequence else [np.array([i]) for i in range(n)]
    for frames in groups:
        if len(frames) == 0 or rng.random() < clean_fraction:
            continue
        allowed = kinds or KINDS
        layers = 2 if rng.random() < extra_fraction and len(allowed) > 1 else 1
        alpha_total = np.zeros((len(frames), size, size), np.float32)
        used: list[str] = []
        for _ in range(layers):
            kind = pick_kind(rng, styles, tuple(k for k in allowed if k not in used))
            used.append(kind)
            first = mouth_frame(masks[frames[0]])
            sprite = DRAW[kind](rng, first.unit, styles, face_skin_colour(crops[frames[0]], first))
            pose, motion, look = initial_pose(rng, kind), random_motion(rng), random_look(rng)
            for j, i in enumerate(frames):
                mouth = mouth_frame(masks[i])
                now, later = motion.at(pose, j), motion.at(pose, j + 1)
                blur = (
                    ((later.dx - now.dx) * mouth.unit * 0.5, (later.dy - now.dy) * mouth.unit * 0.5)
                    if len(frames) > 1
                    else (0.0, 0.0)
                )
                layer = place(sprite, now, mouth, size, blur)
                out[i], alpha = blend(out[i], layer, look, mouth.unit)
                alpha_total[j] = np.maximum(alpha_total[j], alpha)
        occlusion[frames] = np.clip(np.rint(alpha_total * 255.0), 0, 255).astype(np.uint8)
        for i in frames:
            labels[i] = "+".join(used)
    return Composite(out, occlusion, labels)
