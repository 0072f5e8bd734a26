"""The selective scan: the PyTorch paths against a step-by-step recurrence, and the CUDA kernel on a GPU."""

from __future__ import annotations

import pytest
import torch

from models.mamba import MambaLayer, mamba_ssm_scan, selective_scan, selective_scan_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def torch_scan(**inputs):
    return selective_scan(**inputs, backend="torch")


def scan_inputs(batch=2, channels=8, length=77, state=4, groups=2, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(requires_grad)

    A = (-torch.rand(channels, state, generator=g) * 3).to(device).requires_grad_(requires_grad)
    return dict(
        u=randn(batch, channels, length),
        delta=randn(batch, channels, length),
        A=A,
        B=randn(batch, groups, state, length),
        C=randn(batch, groups, state, length),
        D=randn(channels),
        z=randn(batch, channels, length),
        delta_bias=randn(channels),
        delta_softplus=True,
    )


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 16, 128])
@pytest.mark.parametrize("length", [1, 20, 77])
def test_torch_scan_matches_stepwise_recurrence(chunk_size, length):
    inputs = scan_inputs(length=length)
    with torch.no_grad():
        expected = selective_scan_reference(**inputs)
        got = selective_scan(**inputs, chunk_size=chunk_size, backend="torch")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_blocked_scan_carries_the_state_across_blocks(monkeypatch):
    import models.mamba

    inputs = scan_inputs(length=50)
    monkeypatch.setattr(models.mamba, "BLOCK_ELEMENTS", 7 * 2 * 8 * 4)  # 7 steps of (b=2, d=8, n=4)
    with torch.no_grad():
        torch.testing.assert_close(torch_scan(**inputs), selective_scan_reference(**inputs), rtol=1e-4, atol=1e-4)


def test_ungrouped_B_and_C_are_shared_by_all_channels():
    inputs = scan_inputs(groups=1)
    inputs["B"], inputs["C"] = inputs["B"][:, 0], inputs["C"][:, 0]
    with torch.no_grad():
        torch.testing.assert_close(torch_scan(**inputs), selective_scan_reference(**inputs), rtol=1e-4, atol=1e-4)


def test_long_chunked_scan_stays_finite_when_decays_are_extreme():
    inputs = scan_inputs(length=300)
    inputs["delta"] = inputs["delta"] * 50  # softplus(delta) up to ~100: exp(delta*A) underflows
    with torch.no_grad():
        got = selective_scan(**inputs, chunk_size=32, backend="torch")
        expected = selective_scan_reference(**inputs)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_hand_written_backward_matches_autograd_of_the_recurrence():
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    expected_inputs = scan_inputs(length=20, requires_grad=True)
    got_inputs = scan_inputs(length=20, requires_grad=True)
    weights = torch.randn(2, 8, 20, generator=torch.Generator().manual_seed(1))
    (selective_scan_reference(**expected_inputs) * weights).sum().backward()
    (torch_scan(**got_inputs) * weights).sum().backward()
    for name in names:
        torch.testing.assert_close(got_inputs[name].grad, expected_inputs[name].grad, rtol=1e-4, atol=1e-4, msg=name)


def test_half_precision_inputs_are_scanned_in_float32():
    inputs = scan_inputs(length=40)
    half = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and k not in ("A",) else v) for k, v in inputs.items()}
    with torch.no_grad():
        got = torch_scan(**half)
        expected = selective_scan_reference(**{k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in half.items()})
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_bidirectional_layer_sees_the_whole_sequence():
    torch.manual_seed(0)
    layer = MambaLayer(16, d_state=4, directions=2).eval()
    forward_only = MambaLayer(16, d_state=4, directions=1).eval()
    x = torch.randn(1, 30, 16)
    changed = x.clone()
    changed[:, -1] += 1.0  # the last token changes
    with torch.no_grad():
        assert not torch.allclose(layer(x)[:, 0], layer(changed)[:, 0])  # reaches the first token
        torch.testing.assert_close(forward_only(x)[:, 0], forward_only(changed)[:, 0])  # causal


def layer_reference(layer: MambaLayer, x: torch.Tensor) -> torch.Tensor:
    """The Mamba block written batch-major with nn.Conv1d and the step-by-step scan."""
    batch, length, _ = x.shape
    groups, inner = layer.directions, layer.d_inner
    hidden, gate = layer.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    if groups == 2:
        hidden = torch.cat([hidden, hidden.flip(-1)], dim=1)
        gate = torch.cat([gate, gate.flip(-1)], dim=1)
    hidden = torch.nn.functional.silu(layer.conv1d(hidden)[..., :length])
    proj = torch.einsum("bgdl,gkd->bgkl", hidden.view(batch, groups, inner, length), layer.x_proj)
    dt, B, C = proj.split([layer.dt_rank, layer.d_state, layer.d_state], dim=2)
    delta = torch.einsum("bgrl,gdr->bgdl", dt, layer.dt_proj).reshape(batch, groups * inner, length)
    y = selective_scan_reference(hidden, delta, -torch.exp(layer.A_log), B, C, layer.D, gate, layer.dt_bias, True)
    if groups == 2:
        y = y[:, :inner] + y[:, inner:].flip(-1)
    return layer.out_proj(y.transpose(1, 2))


@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("directions", [1, 2])
def test_mamba_layer_matches_the_batch_major_reference(directions, length):
    torch.manual_seed(0)
    layer = MambaLayer(16, d_state=4, directions=directions)
    x = torch.randn(3, length, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer_reference(layer, x), rtol=1e-4, atol=1e-5)


def test_time_major_causal_conv_equals_conv1d():
    torch.manual_seed(0)
    layer = MambaLayer(8, d_state=4, directions=2)
    x = torch.randn(2, 2, 16, 11)  # (b, g, inner, L)
    expected = layer.conv1d(x.reshape(2, 32, 11))[..., :11].view(2, 2, 16, 11)
    got = layer._causal_conv(x.permute(3, 0, 1, 2)).permute(1, 2, 3, 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and mamba_ssm_scan() is not None), reason="needs CUDA and mamba-ssm's compiled kernels"
)
def test_mamba_ssm_kernel_matches_torch_scan_on_gpu():
    inputs = scan_inputs(batch=4, channels=64, length=1024, state=16, device="cuda")
    with torch.no_grad():
        fused = selective_scan(**inputs, backend="cuda").float()
        chunked = torch_scan(**inputs).float()  # the CUDA fallback without mamba-ssm
        cpu = torch_scan(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    for name, other in (("chunked CUDA", chunked), ("CPU", cpu.cuda())):
        print(f"max abs error fused vs {name} scan: {(fused - other).abs().max().item():.3e}")
        torch.testing.assert_close(fused, other, rtol=1e-3, atol=1e-3)
    torch.manual_seed(0)
    layer = MambaLayer(64, directions=2).cuda()
    x = torch.randn(2, 256, 64, device="cuda")
    with torch.no_grad():
        fused_layer = layer(x)
        layer.backend = "torch"
        torch.testing.assert_close(fused_layer, layer(x), rtol=1e-3, atol=1e-3)
