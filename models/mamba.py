"""Mamba (selective state space) layers for StableDub, on any device.

The selective scan (`selective_scan`, mamba-ssm's `selective_scan_fn` contract; `scan_time_major`,
the same on time-major tensors) runs on:
- mamba-ssm's fused CUDA kernel, when the tensors are on CUDA and `mamba_ssm` imports;
- on CUDA without mamba-ssm, our Triton kernels (`models.scan_triton`) when `triton` imports;
- on CUDA without either, a chunked doubling (Hillis-Steele) scan;
- on CPU, a time-major in-place recurrence (inference: cache-sized blocks of steps; training: the
  same with a hand-written backward).
`selective_scan_reference` is a naive step-by-step recurrence, written for reading; tests use it.

`MambaLayer` is the standard Mamba block (Linear -> depthwise causal Conv -> selective SSM -> Linear,
gated by a parallel Linear branch) that scans a sequence in one or two directions; the directions
are stacked as channel groups so one scan call serves them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

# CPU inference scans blocks of steps whose decays and states (~2 x BLOCK_ELEMENTS floats) stay in
# cache; measured here, 2^18..2^20 is 1.5-3x faster than whole-sequence tensors (2^24).
BLOCK_ELEMENTS = 1 << 19
# On CUDA without mamba-ssm a per-step loop is one kernel launch per step; the doubling scan needs
# log2(chunk) launches per chunk instead.
CUDA_CHUNK_SIZE = 64


@lru_cache(maxsize=1)
def mamba_ssm_scan() -> Callable | None:
    """mamba-ssm's fused selective scan, or None where it is not installed or has no CUDA build."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or the compiled selective_scan_cuda failing to load
        return None
    return selective_scan_fn


@lru_cache(maxsize=1)
def triton_scan() -> Callable | None:
    """Our Triton selective scan (models.scan_triton), or None where triton does not import.

    Only asked for CUDA tensors (or backend="triton"), so a CPU run never imports triton."""
    try:
        from models.scan_triton import selective_scan_triton
    except Exception:  # ImportError, or a triton build that cannot load here
        return None
    return selective_scan_triton


BACKENDS = ("auto", "cuda", "triton", "torch")


def _groups(x: Tensor) -> Tensor:
    """B or C as (b, g, n, L): a (b, n, L) tensor is one group shared by all channels."""
    return x.unsqueeze(1) if x.dim() == 3 else x


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
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, length = u.shape
    B, C = _groups(B).float(), _groups(C).float()
    groups = B.shape[1]
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A.float())
        B_t = B[..., t].repeat_interleave(d // groups, dim=1)  # (b, d, n)
        C_t = C[..., t].repeat_interleave(d // groups, dim=1)
        h = decay * h + delta[:, :, t, None] * B_t * u[:, :, t, None]
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[None, :, None].float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


# The scans below are time-major: delta, u (L, b, g, c); A (g, c, n); B, C (L, b, g, 1, n) with
# g groups of c channels. Time-major makes every step's slice one contiguous block, so a step is a
# single in-place addcmul; everything else is done for all steps at once.


def _recur(decay: Tensor, H: Tensor) -> None:
    """In place: H[t] += decay[t] * H[t-1] for t = 1..L-1 (H[0] already holds the first state)."""
    for t in range(1, H.shape[0]):
        torch.addcmul(H[t], decay[t], H[t - 1], out=H[t])


def _contract(H: Tensor, C: Tensor) -> Tensor:
    """y = sum_n H * C as one batched matmul (C is shared by a group's channels)."""
    return torch.matmul(H, C.transpose(-1, -2)).squeeze(-1)


def _scan_blocked(delta: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, block_elements: int) -> Tensor:
    """Inference scan: blocks of steps bound the memory to ~2 x block_elements floats."""
    length = delta.shape[0]
    step_elements = delta[0].numel() * A.shape[-1]
    block = max(1, block_elements // step_elements)
    y = delta.new_empty(delta.shape)
    h = None
    for start in range(0, length, block):
        stop = min(length, start + block)
        dt = delta[start:stop]
        decay = (dt[..., None] * A).exp_()
        H = (dt * u[start:stop])[..., None] * B[start:stop]
        if h is not None:
            H[0].addcmul_(decay[0], h)
        _recur(decay, H)
        y[start:stop] = _contract(H, C[start:stop])
        h = H[-1]
    return y


def _scan_chunked(delta: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> Tensor:
    """Chunk by chunk; inside a chunk a Hillis-Steele doubling scan (log2(chunk) whole-chunk passes).

    The decay over (s, t] is exp(S_t - S_s) with S the running sum of delta*A inside the chunk; S
    only falls, so every exponent is <= 0 and nothing overflows, whatever delta grows to in training.
    """
    length = delta.shape[0]
    h = None
    ys = []
    for start in range(0, length, chunk):
        stop = min(length, start + chunk)
        dt = delta[start:stop, ..., None]
        S = torch.cumsum(dt * A, dim=0)  # (l, b, g, c, n)
        x = (dt * u[start:stop, ..., None]) * B[start:stop]
        step = 1
        while step < stop - start:
            carried = torch.addcmul(x[step:], torch.exp(S[step:] - S[:-step]), x[:-step])
            x = torch.cat([x[:step], carried], dim=0)
            step *= 2
        H = x if h is None else torch.addcmul(x, torch.exp(S), h)
        ys.append((H * C[start:stop]).sum(-1))
        h = H[-1]
    return torch.cat(ys, dim=0)


class _ScanWithGradient(torch.autograd.Function):
    """Training scan with a hand-written backward: the gradient of a linear recurrence is the same
    recurrence run backwards, so one reverse loop plus whole-tensor products replace the thousands
    of small autograd nodes a per-step loop would record."""

    @staticmethod
    def forward(ctx, delta: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        H = (delta * u)[..., None] * B
        _recur((delta[..., None] * A).exp_(), H)
        ctx.save_for_backward(delta, u, A, B, C, H)
        return _contract(H, C)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, ...]:
        delta, u, A, B, C, H = ctx.saved_tensors
        decay = torch.exp(delta[..., None] * A)
        grad_H = grad_y[..., None] * C  # from each step's output; then add what flows back from h_{t+1}
        for t in range(H.shape[0] - 2, -1, -1):
            torch.addcmul(grad_H[t], decay[t + 1], grad_H[t + 1], out=grad_H[t])
        previous = torch.cat([torch.zeros_like(H[:1]), H[:-1]], dim=0)
        grad_exponent = grad_H * previous * decay  # dL/d(delta A)
        grad_input = (grad_H * B).sum(-1)  # dL/d(delta u)
        grad_delta = (grad_exponent * A).sum(-1) + grad_input * u
        grad_u = grad_input * delta
        grad_A = (grad_exponent * delta[..., None]).sum(dim=(0, 1))
        grad_B = (grad_H * (delta * u)[..., None]).sum(dim=3, keepdim=True)
        grad_C = (grad_y[..., None] * H).sum(dim=3, keepdim=True)
        return grad_delta, grad_u, grad_A, grad_B, grad_C


def scan_time_major(
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
    backend: str = "auto",
) -> Tensor:
    """The selective SSM on time-major tensors: u, delta, z (L, b, g, c); A (g*c, n); B, C (L, b, g, n);
    D, delta_bias (g*c,). Returns y (L, b, g, c) in u's dtype, computed in float32.

    `backend`: "auto" picks mamba-ssm's kernel on CUDA when it is installed, else our Triton kernel
    on CUDA when triton imports (and no `chunk_size` is asked for), else the PyTorch scans; "cuda"
    insists on mamba-ssm, "triton" on the Triton kernel (CPU tensors only under TRITON_INTERPRET=1),
    "torch" on the PyTorch scans. Those: on CPU, training (gradients needed) uses the in-place
    recurrence with its own backward and inference the same recurrence in cache-sized blocks of
    steps; on CUDA, and whenever `chunk_size` is given, the chunked doubling scan.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: one of {', '.join(BACKENDS)}")
    length, batch, groups, channels = u.shape
    fused = mamba_ssm_scan() if backend in ("auto", "cuda") else None
    if backend == "cuda" and (fused is None or not u.is_cuda):
        raise RuntimeError("backend='cuda' needs CUDA tensors and mamba-ssm with its compiled kernels")

    def batch_major(x: Tensor) -> Tensor:
        return x.permute(1, 2, 3, 0).reshape(batch, groups * channels, length)

    use_triton = backend == "triton" or (backend == "auto" and u.is_cuda and fused is None and chunk_size is None)
    kernel = triton_scan() if use_triton else None
    if backend == "triton" and kernel is None:
        raise RuntimeError("backend='triton' needs triton installed (pip install triton)")
    if kernel is not None:
        # Permuted views, no copies: the kernel reads any strides and writes y in u's layout.
        y = kernel(
            batch_major(u),
            batch_major(delta),
            A,
            B.permute(1, 2, 3, 0),
            C.permute(1, 2, 3, 0),
            D,
            None if z is None else batch_major(z),
            delta_bias,
            delta_softplus,
        )
        return y.view(batch, groups, channels, length).permute(3, 0, 1, 2)
    if fused is not None and u.is_cuda:
        y = fused(
            batch_major(u).contiguous(),
            batch_major(delta).contiguous(),
            A.float().contiguous(),
            B.permute(1, 2, 3, 0).contiguous(),
            C.permute(1, 2, 3, 0).contiguous(),
            None if D is None else D.float().contiguous(),
            None if z is None else batch_major(z).contiguous(),
            None if delta_bias is None else delta_bias.float().contiguous(),
            delta_softplus,
        )
        return y.view(batch, groups, channels, length).permute(3, 0, 1, 2)

    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float().view(groups, channels)
    if delta_softplus:
        delta = F.softplus(delta)
    args = (
        delta.contiguous(),
        u.contiguous(),
        A.float().view(groups, channels, -1),
        B.float()[..., None, :],
        C.float()[..., None, :],
    )
    if chunk_size is None and u.is_cuda:
        chunk_size = CUDA_CHUNK_SIZE
    if chunk_size is not None:
        y = _scan_chunked(*args, chunk=chunk_size)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in args):
        y = _ScanWithGradient.apply(*args)
    else:
        y = _scan_blocked(*args, block_elements=BLOCK_ELEMENTS)
    if D is not None:
        y = y + u * D.float().view(groups, channels)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


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
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """mamba-ssm's `selective_scan_fn` contract ((b, d, L) tensors), on any device; see `scan_time_major`."""
    b, d, length = u.shape
    B, C = _groups(B), _groups(C)
    groups = B.shape[1]

    def time_major(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.view(b, groups, d // groups, length).permute(3, 0, 1, 2)

    y = scan_time_major(
        time_major(u),
        time_major(delta),
        A,
        B.permute(3, 0, 1, 2),
        C.permute(3, 0, 1, 2),
        D,
        time_major(z),
        delta_bias,
        delta_softplus,
        chunk_size,
        backend,
    )
    return y.permute(1, 2, 3, 0).reshape(b, d, length)


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
        nn.init.uniform_(self.x_proj, -(self.d_inner**-0.5), self.d_inner**-0.5)
        nn.init.uniform_(self.dt_proj, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(self.dt_bias.shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x: Tensor) -> Tensor:
        # Time-major throughout: the scan steps over the outer axis, and moving whole rows of
        # channels is cheap where transposing channels against time is not.
        groups = self.directions
        hidden, gate = self.in_proj(x.transpose(0, 1)).chunk(2, dim=-1)  # (L, b, inner) each
        if groups == 2:
            hidden = torch.stack([hidden, hidden.flip(0)], dim=2)
            gate = torch.stack([gate, gate.flip(0)], dim=2)
        else:
            hidden, gate = hidden[:, :, None], gate[:, :, None]
        hidden = F.silu(self._causal_conv(hidden))  # (L, b, g, inner)
        proj = torch.einsum("lbgd,gkd->lbgk", hidden, self.x_proj.to(hidden.dtype))
        dt, B, C = proj.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = torch.einsum("lbgr,gdr->lbgd", dt, self.dt_proj.to(hidden.dtype))
        y = scan_time_major(
            hidden,
            delta,
            -torch.exp(self.A_log.float()),
            B,
            C,
            self.D,
            gate,
            self.dt_bias,
            delta_softplus=True,
            backend=self.backend,
        ).to(x.dtype)
        y = y[:, :, 0] + y[:, :, 1].flip(0) if groups == 2 else y[:, :, 0]
        return self.out_proj(y).transpose(0, 1)

    def _causal_conv(self, x: Tensor) -> Tensor:
        """Depthwise causal conv along time on (L, b, g, inner), with conv1d's weights."""
        kernel = self.conv1d.kernel_size[0]
        weight = self.conv1d.weight.view(self.directions, self.d_inner, kernel).to(x.dtype)
        bias = self.conv1d.bias.view(self.directions, self.d_inner).to(x.dtype)
        out = torch.addcmul(bias, x, weight[..., kernel - 1])
        for k in range(kernel - 1):
            shift = kernel - 1 - k  # tap k sees the input `shift` steps back
            out[shift:].addcmul_(x[:-shift], weight[..., k])
        return out
