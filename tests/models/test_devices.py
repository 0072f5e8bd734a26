"""The device and dtype policy that every config setting goes through."""

from __future__ import annotations

import pytest
import torch

from models.devices import resolve_device, resolve_dtype


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_elsewhere():
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda:1")) == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32


def test_named_dtypes_are_taken_as_given_and_unknown_ones_refused():
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="fp8"):
        resolve_dtype("fp8", "cuda")


def test_auto_device_is_the_gpu_only_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
