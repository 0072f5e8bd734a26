"""The Triton selective scan against the step-by-step recurrence, forward and gradients, run by
Triton's CPU interpreter in a child process (TRITON_INTERPRET must be set before triton is
imported, and this test session may already have imported it without)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_inputs(batch=1, channels=8, length=20, state=4, groups=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)

    return dict(
        u=randn(batch, channels, length),
        delta=randn(batch, channels, length),
        A=(-torch.rand(channels, state, generator=g) * 3).requires_grad_(True),
        B=randn(batch, groups, state, length),
        C=randn(batch, groups, state, length),
        D=randn(channels),
        z=randn(batch, channels, length),
        delta_bias=randn(channels),
        delta_softplus=True,
    )


def compare(name, scan, reference, tolerance=1e-4, **shape):
    """Forward and every input's gradient of `scan` against `reference` on the same inputs."""
    expected_inputs, got_inputs = scan_inputs(**shape), scan_inputs(**shape)
    expected, got = reference(**expected_inputs), scan(**got_inputs)
    assert got.dtype == expected.dtype and got.shape == expected.shape, name
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    (expected.float() * weights).sum().backward()
    (got.float() * weights).sum().backward()
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance, msg=name)
    worst = (got.float() - expected.float()).abs().max().item()
    for key in INPUTS:
        a, b = got_inputs[key].grad, expected_inputs[key].grad
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance, msg=f"{name}: d{key}")
        worst = max(worst, (a.float() - b.float()).abs().max().item())
    print(f"ok {name} max abs error {worst:.2e}")


def interpreter_checks() -> None:
    from models.mamba import MambaLayer, selective_scan, selective_scan_reference
    from models.scan_triton import selective_scan_triton

    torch.set_num_threads(1)

    def triton(block_l=8, **kw):
        return lambda **inputs: selective_scan_triton(**inputs, block_l=block_l, **kw)

    compare("grouped B and C, 3 chunks of 8 steps", triton(), selective_scan_reference)
    compare("odd channels per group: 1 channel per program", triton(), selective_scan_reference, channels=6, state=3)
    compare("one step", triton(), selective_scan_reference, length=1)
    compare("a chunk longer than the sequence", triton(block_l=32), selective_scan_reference)
    compare("bfloat16 inputs", triton(), selective_scan_reference, tolerance=3e-2, dtype=torch.bfloat16)

    def ungrouped(scan):
        return lambda B, C, **inputs: scan(B=B[:, 0], C=C[:, 0], **inputs)  # (b, n, L): one group

    compare(
        "selective_scan(backend='triton'), B and C (b, n, L)",
        ungrouped(lambda **i: selective_scan(**i, backend="triton")),
        ungrouped(selective_scan_reference),
        groups=1,
    )

    # The Mamba block's time-major call (permuted views, bidirectional groups) against the torch scan.
    torch.manual_seed(0)
    layer = MambaLayer(4, d_state=4, directions=2)
    x = torch.randn(1, 11, 4)
    outputs, grads = {}, {}
    for backend in ("torch", "triton"):
        layer.backend = backend
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.square().sum().backward()
        outputs[backend], grads[backend] = out, [xi.grad] + [p.grad.clone() for p in layer.parameters()]
    torch.testing.assert_close(outputs["triton"], outputs["torch"], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    print("ok MambaLayer forward and parameter gradients")


@needs_triton
@pytest.mark.timeout(660)  # ~5 s of CPU; the guard is for a loaded machine
def test_triton_scan_matches_the_recurrence_in_the_interpreter():
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("ok ") == 7


@needs_triton
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from models.mamba import selective_scan

    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        selective_scan(**scan_inputs(length=4), backend="triton")


def test_an_unknown_backend_is_refused():
    from models.mamba import selective_scan

    with pytest.raises(ValueError, match="one of auto, cuda, triton, torch"):
        selective_scan(**scan_inputs(length=4), backend="fast")


if __name__ == "__main__":
    interpreter_checks()


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_matches_the_torch_scans_on_gpu():
    from models.mamba import mamba_ssm_scan, selective_scan

    inputs = {k: v.detach().cuda() if isinstance(v, torch.Tensor) else v for k, v in scan_inputs(4, 64, 1024, 16, 2).items()}
    with torch.no_grad():
        got = selective_scan(**inputs, backend="triton")
        others = {"chunked CUDA": selective_scan(**inputs, backend="torch")}
        if mamba_ssm_scan() is not None:
            others["mamba-ssm"] = selective_scan(**inputs, backend="cuda")
    for name, other in others.items():
        print(f"max abs error triton vs {name} scan: {(got - other).abs().max().item():.3e}")
        torch.testing.assert_close(got, other, rtol=1e-3, atol=1e-3)
    compare_on = {k: v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    reference = {k: v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    selective_scan(**compare_on, backend="triton").square().sum().backward()
    selective_scan(**reference, backend="torch").square().sum().backward()
    for key in INPUTS:
        torch.testing.assert_close(compare_on[key].grad, reference[key].grad, rtol=2e-3, atol=2e-3, msg=key)
