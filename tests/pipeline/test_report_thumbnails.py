"""The QC report's before/after thumbnails show the mouth: the lower part of the dubbed face's box."""

from __future__ import annotations

import numpy as np

from pipeline.report import THUMB_HEIGHT, face_crop


def test_thumbnail_is_the_mouth_region_of_the_face_box():
    image = np.zeros((400, 400, 3), np.uint8)
    box = [100, 100, 300, 300]  # face box; eyes in its upper half, mouth in its lower part
    image[130:170, 140:260] = (0, 0, 255)  # "eyes": blue
    image[240:270, 160:240] = (255, 0, 0)  # "mouth": red
    crop = face_crop(image, box)
    assert crop.shape[0] == THUMB_HEIGHT
    assert (crop[..., 0] > 200).mean() > 0.05, "the mouth is in it"
    assert (crop[..., 2] > 200).sum() == 0, "the eyes are not in it"


def test_a_box_at_the_frame_edge_stays_inside_the_frame():
    image = np.full((100, 160, 3), 50, np.uint8)
    crop = face_crop(image, [120, 40, 170, 110])
    assert crop.shape[0] == THUMB_HEIGHT and crop.shape[1] >= 1
