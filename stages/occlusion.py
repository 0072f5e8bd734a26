"""Occlusion segment stage: per-pixel mask of occluders (hands, microphones, cups, hair) in front of
the mouth, so paste-back keeps their source pixels over the regenerated mouth.

For every track, the segmenter (models/occlusion_net.py) runs on one region of interest around the
track's lower-face mask; occluder probabilities are smoothed along the track (occluders move slowly,
and a flickering mask would make the pasted mouth flicker), thresholded, grown a little so occluder
edges keep their source pixels, feathered, and kept only inside the region to regenerate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from stages.base import SegmentStage
from stages.schema import Segment
from stages.settings import Count, NonNegativeFloat, NonNegativeInt, OneOf, Probability, Range, Settings


@dataclass
class OcclusionConfig(Settings, section="occlusion"):
    method: Annotated[str, OneOf("net", "none")] = (
        "net"  # net: the occlusion segmenter; none: no occluders (regenerate the whole mask)
    )
    weights: str = ""  # save_pretrained folder (local path or fsspec URL); empty: the shipped weights
    threshold: Probability = 0.5  # occluder probability above which a pixel keeps its source
    temporal_sigma: NonNegativeFloat = 1.0  # frames: Gaussian smoothing of probabilities along a track
    grow: Annotated[float, Range(0, 1)] = 0.012  # fraction of the crop side the mask grows by (occluder edges, blur)
    feather: Annotated[float, Range(0, 1)] = 0.006  # fraction of the crop side: soft mask edge
    batch_size: Count = 32
    threads: NonNegativeInt = 0  # torch threads per actor (0: leave as set, e.g. by Ray's OMP_NUM_THREADS)


class OcclusionSegment(SegmentStage):
    name = "occlusion"

    def __init__(self, config: OcclusionConfig) -> None:
        super().__init__(config)
        self.settings = config
        self.net = None
        if self.settings.method == "net":
            import torch

            from models.occlusion_net import load_occlusion_net

            if self.settings.threads > 0:
                torch.set_num_threads(self.settings.threads)
            self.net = load_occlusion_net(self.settings.weights)

    def process(self, segment: Segment) -> Segment:
        occluded = 0
        for track in segment.tracks:
            if self.net is None:
                track.occlusion = np.zeros(track.mask.shape, np.uint8)
                continue
            track.occlusion = segment_occluders(self.net, track.crops, track.mask, self.settings)
            occluded += int((track.occlusion >= 128).any(axis=(1, 2)).sum())
        segment.counts["frames_occluded"] = occluded
        return segment


def occluder_probability(net, crops: np.ndarray, masks: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Occluder probability (N, R, R) float32 in the track's ROI, and the crop -> ROI affine."""
    import torch
    import torch.nn.functional as F

    from models.occlusion_net import roi_affine

    size = net.config.input_size
    affine = roi_affine(masks, size)
    rois = np.stack(
        [cv2.warpAffine(c, affine, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) for c in crops]
    )
    out = np.empty((len(crops), size, size), np.float32)
    with torch.inference_mode():
        for i in range(0, len(rois), batch_size):
            x = torch.from_numpy(rois[i : i + batch_size]).to(net.device).permute(0, 3, 1, 2).float().div_(255.0)
            logits = net(x.contiguous(memory_format=torch.channels_last)).logits
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
            out[i : i + batch_size] = torch.sigmoid(logits)[:, 0].cpu().numpy()
    return out, affine


def smooth_along_track(probability: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing over frames: an occluder moves slowly, a mask must not flicker."""
    if sigma <= 0 or len(probability) < 2:
        return probability
    return gaussian_filter1d(probability, sigma, axis=0, mode="nearest")


def to_crop(probability: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """One frame's ROI probability resampled into crop coordinates (S, S)."""
    return cv2.warpAffine(probability, affine, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderValue=0.0)


def occlusion_mask(probability: np.ndarray, affine: np.ndarray, mask: np.ndarray, settings: OcclusionConfig) -> np.ndarray:
    """One frame's uint8 occluder mask in crop coordinates from its ROI probability."""
    size = mask.shape[-1]
    hard = (to_crop(probability, affine, size) > settings.threshold).astype(np.uint8) * 255
    region = mask > 0
    if not hard[region].any():
        return np.zeros_like(mask)
    grow = int(round(settings.grow * size))
    if grow > 0:
        hard = cv2.dilate(hard, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    if settings.feather > 0:
        hard = cv2.GaussianBlur(hard, (0, 0), settings.feather * size)
    hard[~region] = 0
    return hard


def segment_occluders(net, crops: np.ndarray, masks: np.ndarray, settings: OcclusionConfig) -> np.ndarray:
    """Occluder masks (N, S, S) uint8 0..255 for one track's crops (N, S, S, 3) and masks (N, S, S)."""
    if len(crops) == 0:
        return np.zeros(masks.shape, np.uint8)
    probability, affine = occluder_probability(net, crops, masks, settings.batch_size)
    probability = smooth_along_track(probability, settings.temporal_sigma)
    return np.stack([occlusion_mask(p, affine, m, settings) for p, m in zip(probability, masks)])
