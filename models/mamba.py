"""Mamba (selective state space) layers for StableDub, on any device.

The selective scan has three implementations with one signature (mamba-ssm's `selective_scan_fn`):
- `selective_scan_reference`: a naive step-by-step recurrence, written for reading; tests use it;
- `selective_scan_torch`: the pure-PyTorch path used on CPU (and on GPUs without mamba-ssm): a
  stepwise loop for short sequences (the temporal scan over a window's frames) and a chunked
  doubling scan for long ones (the spatial scan over a latent's pixels);
- mamba-ssm's fused CUDA kernel, used when the tensors are on CUDA and `mamba_ssm` imports.

`MambaLayer` is the standard Mamba block (Linear -> depthwise causal Conv -> selective SSM -> Linear,
gated by a parallel Linear branch) that scans a sequence in one or more directions; the directions
are stacked as channel groups so one scan call serves them all.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

# The per-step loop makes ~5 passes over the (b, d, L, n) state, the doubling scan ~25, so the loop
# wins on CPU unless each step is too small to cover Python's per-op overhead (measured here:
# loop faster at >= 8k elements per step; chunks of 16 best below that, on long sequences).
STEPWISE_MIN_STEP_ELEMENTS = 8192
STEPWISE_MAX_LENGTH = 64
CHUNK_SIZE = 16


@lru_cache(maxsize=1)
def mamba_ssm_scan() -> Callable | None:
    """mamba-ssm's fused selective scan, or None where it is not installed or has no CUDA build."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or the compiled selective_scan_cuda failing to load
        return None
    return selective_scan_fn


def _grouped(x: Tensor) -> Tensor:
    """B or C, (b, n, L) or (b, g, n, L) -> (b, g, 1, L, n): broadcasts over each group's channels."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.transpose(-1, -2).unsqueeze(2).float()


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + u * D[None, :, None].float()
    if z is not None:
        y = y * F.silu(z.float())
    return y


def _discretise(u: Tensor, delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> tuple[Tensor, Tensor]:
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t + D u_t;  y *= silu(z).

    u, delta, z: (b, d, L); A: (d, n); B, C: (b, n, L) or (b, g, n, L) with g dividing d; D: (d,).
    Returns float32 (b, d, L).
    """
    dtype_in = u.dtype
    u, delta = _discretise(u, delta, delta_bias, delta_softplus)
    b, d, length = u.shape
    Bx, Cx = _grouped(B), _grouped(C)  # (b, g, 1, L, n)
    groups = Bx.shape[1]
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A.float())
        B_t = Bx[:, :, 0, t].repeat_interleave(d // groups, dim=1)  # (b, d, n)
        C_t = Cx[:, :, 0, t].repeat_interleave(d // groups, dim=1)
        h = decay * h + delta[:, :, t, None] * B_t * u[:, :, t, None]
        ys.append((h * C_t).sum(-1))
    return _finish(torch.stack(ys, dim=-1), u, D, z).to(dtype_in)


# The two scans below see channels split into groups: u, delta (b, g, c, L); A (g, c, n);
# B, C (b, g, 1, L, n). They return y (b, g, c, L) before the D and gate terms.


def _scan_stepwise(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    # Per-step tensors are made inside the loop: precomputing all steps would hold (L, b, d, n) at once.
    du = delta * u
    h = u.new_zeros(*u.shape[:-1], A.shape[-1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.addcmul(du[..., t, None] * B[..., t, :], torch.exp(delta[..., t, None] * A), h)
        ys.append((h * C[..., t, :]).sum(-1))
    return torch.stack(ys, dim=-1)


def _scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> Tensor:
    """Chunk by chunk; inside a chunk a Hillis-Steele doubling scan.

    The decay over (s, t] is exp(S_t - S_s) with S the running sum of delta*A inside the chunk; S
    only falls, so every exponent is <= 0 and nothing overflows, whatever delta grows to in training.
    """
    length = u.shape[-1]
    h = u.new_zeros(*u.shape[:-1], A.shape[-1])
    A = A[..., None, :]  # (g, c, 1, n)
    ys = []
    for start in range(0, length, chunk):
        stop = min(length, start + chunk)
        dt = delta[..., start:stop, None]
        S = torch.cumsum(dt * A, dim=-2)  # (b, g, c, l, n)
        x = (dt * u[..., start:stop, None]) * B[..., start:stop, :]
        step = 1
        while step < stop - start:
            carried = torch.addcmul(x[..., step:, :], torch.exp(S[..., step:, :] - S[..., :-step, :]), x[..., :-step, :])
            x = torch.cat([x[..., :step, :], carried], dim=-2)
            step *= 2
        H = torch.addcmul(x, torch.exp(S), h[..., None, :])
        ys.append((H * C[..., start:stop, :]).sum(-1))
        h = H[..., -1, :]
    return torch.cat(ys, dim=-1)


def _states(u: Tensor, delta: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """All states H (b, g, c, L, n) and the decays exp(delta A) (same shape)."""
    decay = torch.exp(delta[..., None] * A[..., None, :])
    inputs = (delta * u)[..., None] * B
    H = torch.empty_like(inputs)
    h = torch.zeros_like(inputs[..., 0, :])
    for t in range(u.shape[-1]):
        h = torch.addcmul(inputs[..., t, :], decay[..., t, :], h)
        H[..., t, :] = h
    return H, decay


class _ScanWithGradient(torch.autograd.Function):
    """Stepwise scan with a hand-written backward: the gradient of a linear recurrence is the same
    recurrence run backwards, so one reverse loop plus a few whole-tensor products replace the
    thousands of small autograd nodes a per-step loop would record."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        H, _ = _states(u, delta, A, B)
        ctx.save_for_backward(u, delta, A, B, C, H)
        return (H * C).sum(-1)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, ...]:
        u, delta, A, B, C, H = ctx.saved_tensors
        decay = torch.exp(delta[..., None] * A[..., None, :])
        from_output = grad_y[..., None] * C
        grad_H = torch.empty_like(H)
        carried = torch.zeros_like(H[..., 0, :])  # dL/dh_t arriving from h_{t+1}
        for t in reversed(range(u.shape[-1])):
            grad_h = from_output[..., t, :] + carried
            grad_H[..., t, :] = grad_h
            carried = grad_h * decay[..., t, :]
        previous = torch.cat([torch.zeros_like(H[..., :1, :]), H[..., :-1, :]], dim=-2)
        grad_exponent = grad_H * previous * decay  # dL/d(delta A)
        grad_input = (grad_H * B).sum(-1)  # dL/d(delta u)
        grad_u = grad_input * delta
        grad_delta = (grad_exponent * A[..., None, :]).sum(-1) + grad_input * u
        grad_A = (grad_exponent * delta[..., None]).sum(dim=(0, 3))
        grad_B = (grad_H * (delta * u)[..., None]).sum(dim=2, keepdim=True)
        grad_C = (grad_y[..., None] * H).sum(dim=2, keepdim=True)
        return grad_u, grad_delta, grad_A, grad_B, grad_C


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Same contract as `selective_scan_reference`; computes in float32 whatever the input dtype.

    Training (gradients needed) uses the stepwise scan with its own backward. Inference picks the
    stepwise loop for short sequences or large steps, else chunks of CHUNK_SIZE. A `chunk_size`
    forces the chunked scan with that chunk (tests use it).
    """
    dtype_in = u.dtype
    u, delta = _discretise(u, delta, delta_bias, delta_softplus)
    b, d, length = u.shape
    Bx, Cx = _grouped(B), _grouped(C)
    groups = Bx.shape[1]
    shape = (b, groups, d // groups, length)
    args = (u.view(shape), delta.reshape(shape), A.float().view(groups, d // groups, -1), Bx, Cx)
    step_elements = b * d * A.shape[-1]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    if chunk_size is None and needs_grad:
        y = _ScanWithGradient.apply(*args)
    elif chunk_size is None and (length <= STEPWISE_MAX_LENGTH or step_elements >= STEPWISE_MIN_STEP_ELEMENTS):
        y = _scan_stepwise(*args)
    else:
        y = _scan_chunked(*args, chunk=chunk_size or CHUNK_SIZE)
    return _finish(y.reshape(b, d, length), u, D, z).to(dtype_in)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Dispatch: mamba-ssm's CUDA kernel when possible ("auto"/"cuda"), else the PyTorch scan."""
    fused = mamba_ssm_scan() if backend in ("auto", "cuda") else None
    if backend == "cuda" and (fused is None or not u.is_cuda):
        raise RuntimeError("backend='cuda' needs CUDA tensors and mamba-ssm with its compiled kernels")
    if fused is not None and u.is_cuda:
        return fused(
            u.contiguous(),
            delta.contiguous(),
            A.float().contiguous(),
            B.contiguous(),
            C.contiguous(),
            None if D is None else D.float().contiguous(),
            None if z is None else z.contiguous(),
            None if delta_bias is None else delta_bias.float().contiguous(),
            delta_softplus,
        )
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


class MambaLayer(nn.Module):
    """Mamba block over (batch, length, dim) sequences, scanned in `directions` directions.

    Direction 0 reads the sequence forwards, direction 1 backwards (for non-causal data such as an
    image or a whole window of frames). Each direction has its own conv, projections and SSM
    parameters (as in Vision Mamba) but they share in_proj and out_proj; outputs are summed.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        directions: int = 1,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if directions not in (1, 2):
            raise ValueError("directions must be 1 (forward) or 2 (forward + backward)")
        self.dim, self.d_state, self.directions, self.backend = dim, d_state, directions, backend
        self.d_inner = expand * dim
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        inner, groups = self.d_inner, directions
        self.in_proj = nn.Linear(dim, 2 * inner)
        self.conv1d = nn.Conv1d(groups * inner, groups * inner, d_conv, groups=groups * inner, padding=d_conv - 1)
        self.x_proj = nn.Parameter(torch.empty(groups, self.dt_rank + 2 * d_state, inner))
        self.dt_proj = nn.Parameter(torch.empty(groups, inner, self.dt_rank))
        self.dt_bias = nn.Parameter(torch.empty(groups * inner))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(groups * inner, 1))
        self.D = nn.Parameter(torch.ones(groups * inner))
        self.out_proj = nn.Linear(inner, dim)
        self._init_ssm(dt_min, dt_max)

    def _init_ssm(self, dt_min: float, dt_max: float) -> None:
        # mamba_simple.Mamba's initialisation: dt spread log-uniformly in [dt_min, dt_max].
        nn.init.uniform_(self.x_proj, -self.d_inner**-0.5, self.d_inner**-0.5)
        nn.init.uniform_(self.dt_proj, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(self.dt_bias.shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        groups, inner = self.directions, self.d_inner
        hidden, gate = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (b, inner, L) each
        if groups == 2:
            hidden = torch.cat([hidden, hidden.flip(-1)], dim=1)
            gate = torch.cat([gate, gate.flip(-1)], dim=1)
        hidden = F.silu(self.conv1d(hidden)[..., :length])
        per_group = hidden.view(batch, groups, inner, length)
        proj = torch.einsum("bgdl,gkd->bgkl", per_group, self.x_proj.to(hidden.dtype))
        dt, B, C = proj.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        delta = torch.einsum("bgrl,gdr->bgdl", dt, self.dt_proj.to(hidden.dtype)).reshape(batch, groups * inner, length)
        y = selective_scan(
            hidden,
            delta,
            -torch.exp(self.A_log.float()),
            B.contiguous(),
            C.contiguous(),
            self.D,
            gate,
            self.dt_bias,
            delta_softplus=True,
            backend=self.backend,
        ).to(x.dtype)
        if groups == 2:
            forward_y, backward_y = y.chunk(2, dim=1)
            y = forward_y + backward_y.flip(-1)
        return self.out_proj(y.transpose(1, 2))
