"""Image-stack helpers shared by the model code and the evaluation."""

from __future__ import annotations

import cv2
import numpy as np


def resize_square(stack: np.ndarray, size: int) -> np.ndarray:
    """(N, S, S[, C]) -> (N, size, size[, C]): area averaging down, bicubic up, untouched at the same size."""
    if stack.shape[1] == size:
        return stack
    interpolation = cv2.INTER_AREA if stack.shape[1] > size else cv2.INTER_CUBIC
    return np.stack([cv2.resize(x, (size, size), interpolation=interpolation) for x in stack])
