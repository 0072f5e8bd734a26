"""The one device and dtype policy: what "auto" and the dtype names in a config mean."""

from __future__ import annotations

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; any other name is a torch device ("cpu", "cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`auto`: bfloat16 on CUDA (fp32's range at half the memory, so no fp16 overflow), float32 elsewhere
    (CPU half precision is slow and inexact); else one of DTYPES by name."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A host array as a tensor on `device`. To a GPU it goes through pinned (page-locked) memory
    with a non-blocking copy, so the copy overlaps the GPU's queued work instead of stalling the
    host; elsewhere it is a plain copy (or no copy on the CPU)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
