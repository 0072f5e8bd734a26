"""The selective scan as Triton kernels (forward and backward): fast on a GPU without mamba-ssm's
minutes-long CUDA source build, and exact on CPU under Triton's interpreter (`TRITON_INTERPRET=1`,
set before triton is imported), which is how the tests check it.

Contract: mamba-ssm's `selective_scan_fn` (see `models.mamba.selective_scan_reference`):
u, delta, z (b, d, L); A (d, n); B, C (b, n, L) or (b, g, n, L); D, delta_bias (d,).

One program scans `BLOCK_D` channels of one batch row (all of them in the same B/C group) over the
whole sequence, `BLOCK_L` steps at a time: inside a chunk the recurrence h_t = a_t h_{t-1} + x_t is a
`tl.associative_scan` over (decay, input) pairs, and the state at the chunk's end carries into the
next chunk. The forward saves each chunk's starting state (L / BLOCK_L of them, not the whole
sequence of states); the backward walks the chunks in reverse, recomputes the chunk's states from
the saved one, and runs the adjoint recurrence gh_t = C_t g_t + a_{t+1} gh_{t+1} as a reverse
associative scan. Everything is computed in float32 whatever the input dtype. dB and dC are summed
over a group's channels with atomic adds (their order, so their last bits, varies on a GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Tile sizes on a GPU: chunk steps x channels x states = 32 x 8 x 16 floats per live tile keeps a
# 4-warp program within registers. Chosen for register budget, not timed on a GPU yet.
BLOCK_L = 32
MAX_BLOCK_D = 8


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tensors then live on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _combine(a_left, x_left, a_right, x_right):
    # (a_l, x_l) then (a_r, x_r): h -> a_r (a_l h + x_l) + x_r
    return a_left * a_right, x_left * a_right + x_right


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def _tile(base, channels, t, mask, s_d, s_l):
    """A (steps, channels) tile of a (b, d, L) tensor as float32, 0 outside `mask`."""
    return tl.load(base + channels[None, :] * s_d + t[:, None] * s_l, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _state_tile(base, states, t, mask, s_n, s_l):
    """A (steps, states) tile of B or C (one group) as float32, 0 outside `mask`."""
    return tl.load(base + states[None, :] * s_n + t[:, None] * s_l, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _step_sizes(delta_base, channels, t, mask, s_d, s_l, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta + bias (softplus's argument) and the step size; 0 outside `mask`, so a step past the
    end has decay 1 and input 0 and the state carries through it."""
    raw = _tile(delta_base, channels, t, mask, s_d, s_l)
    if HAS_BIAS:
        raw = raw + bias[None, :]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return raw, tl.where(mask, dt, 0.0)


@triton.jit
def _chunk_states(dt, u, A, Bt, h0):
    """The states of one chunk (steps, channels, states) from the state before it, and the inputs x."""
    decay = tl.exp(dt[:, :, None] * A[None, :, :])
    x = (dt * u)[:, :, None] * Bt[:, None, :]
    carried, local = tl.associative_scan((decay, x), 0, _combine)
    return local + carried * h0[None, :, :], x


@triton.jit
def _channel_parameters(
    A_ptr, D_ptr, bias_ptr, channels, states, dstate, channel_ok, state_ok, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """A (channels, states), D and delta_bias (channels,) as float32; zeros where absent."""
    A = tl.load(A_ptr + channels[:, None] * dstate + states[None, :], mask=channel_ok[:, None] & state_ok[None, :], other=0.0).to(
        tl.float32
    )
    Dv = tl.zeros(channels.shape, dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + channels, mask=channel_ok, other=0.0).to(tl.float32)
    bias = tl.zeros(channels.shape, dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channels, mask=channel_ok, other=0.0).to(tl.float32)
    return A, Dv, bias


@triton.jit
def _scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    states_ptr,
    length,
    dim,
    dstate,
    channels_per_group,
    n_chunks,
    su_b,
    su_d,
    su_l,
    sdt_b,
    sdt_d,
    sdt_l,
    sz_b,
    sz_d,
    sz_l,
    so_b,
    so_d,
    so_l,
    sB_b,
    sB_g,
    sB_n,
    sB_l,
    sC_b,
    sC_g,
    sC_n,
    sC_l,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # offsets in int64: a batch of frames passes 2^31 elements
    pid_d = tl.program_id(1)
    channels = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    states = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_L)
    channel_ok = channels < dim
    state_ok = states < dstate
    group = (pid_d * BLOCK_D) // channels_per_group  # the block's channels share one group
    dn_mask = channel_ok[:, None] & state_ok[None, :]
    A, Dv, bias = _channel_parameters(A_ptr, D_ptr, bias_ptr, channels, states, dstate, channel_ok, state_ok, HAS_D, HAS_BIAS)
    B_base = B_ptr + pid_b * sB_b + group * sB_g
    C_base = C_ptr + pid_b * sC_b + group * sC_g
    state_base = states_ptr + (pid_b * dim + channels[:, None]) * n_chunks * dstate + states[None, :]

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for chunk in range(0, n_chunks):
        tl.store(state_base + chunk * dstate, h, mask=dn_mask)
        t = (chunk * BLOCK_L + rows).to(tl.int64)
        time_ok = t < length
        ld = time_ok[:, None] & channel_ok[None, :]
        ln = time_ok[:, None] & state_ok[None, :]
        u = _tile(u_ptr + pid_b * su_b, channels, t, ld, su_d, su_l)
        _, dt = _step_sizes(delta_ptr + pid_b * sdt_b, channels, t, ld, sdt_d, sdt_l, bias, HAS_BIAS, SOFTPLUS)
        Bt = _state_tile(B_base, states, t, ln, sB_n, sB_l)
        Ct = _state_tile(C_base, states, t, ln, sC_n, sC_l)
        hs, _ = _chunk_states(dt, u, A, Bt, h)
        y = tl.sum(hs * Ct[:, None, :], axis=2)
        h = tl.sum(tl.where(rows[:, None, None] == BLOCK_L - 1, hs, 0.0), axis=0)
        if HAS_D:
            y = y + u * Dv[None, :]
        if HAS_Z:
            z = _tile(z_ptr + pid_b * sz_b, channels, t, ld, sz_d, sz_l)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + pid_b * so_b + channels[None, :] * so_d + t[:, None] * so_l, y, mask=ld)


@triton.jit
def _scan_bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    dout_ptr,
    states_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dA_ptr,
    dB_ptr,
    dC_ptr,
    dD_ptr,
    length,
    dim,
    dstate,
    channels_per_group,
    n_chunks,
    groups,
    su_b,
    su_d,
    su_l,
    sdt_b,
    sdt_d,
    sdt_l,
    sz_b,
    sz_d,
    sz_l,
    sg_b,
    sg_d,
    sg_l,
    sB_b,
    sB_g,
    sB_n,
    sB_l,
    sC_b,
    sC_g,
    sC_n,
    sC_l,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # offsets in int64: a batch of frames passes 2^31 elements
    pid_d = tl.program_id(1)
    channels = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    states = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_L)
    channel_ok = channels < dim
    state_ok = states < dstate
    group = (pid_d * BLOCK_D) // channels_per_group
    dn_mask = channel_ok[:, None] & state_ok[None, :]
    A, Dv, bias = _channel_parameters(A_ptr, D_ptr, bias_ptr, channels, states, dstate, channel_ok, state_ok, HAS_D, HAS_BIAS)
    B_base = B_ptr + pid_b * sB_b + group * sB_g
    C_base = C_ptr + pid_b * sC_b + group * sC_g
    delta_base = delta_ptr + pid_b * sdt_b
    # dB, dC: float32 (b, g, n, L), contiguous
    dB_base = dB_ptr + (pid_b * groups + group) * dstate * length
    dC_base = dC_ptr + (pid_b * groups + group) * dstate * length
    state_base = states_ptr + (pid_b * dim + channels[:, None]) * n_chunks * dstate + states[None, :]
    # du, ddelta, dz: float32 (b, d, L), contiguous
    grad_base = (pid_b * dim + channels[None, :]) * length

    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gh_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # gh at the first step of the chunk after
    for step in range(0, n_chunks):
        chunk = n_chunks - 1 - step
        t = (chunk * BLOCK_L + rows).to(tl.int64)
        time_ok = t < length
        ld = time_ok[:, None] & channel_ok[None, :]
        ln = time_ok[:, None] & state_ok[None, :]
        u = _tile(u_ptr + pid_b * su_b, channels, t, ld, su_d, su_l)
        raw, dt = _step_sizes(delta_base, channels, t, ld, sdt_d, sdt_l, bias, HAS_BIAS, SOFTPLUS)
        # the next step's size, for its decay a_{t+1} in the adjoint recurrence (0 past the end)
        ld1 = (t + 1 < length)[:, None] & channel_ok[None, :]
        _, dt1 = _step_sizes(delta_base, channels, t + 1, ld1, sdt_d, sdt_l, bias, HAS_BIAS, SOFTPLUS)
        Bt = _state_tile(B_base, states, t, ln, sB_n, sB_l)
        Ct = _state_tile(C_base, states, t, ln, sC_n, sC_l)
        # this chunk's states again, from the one saved at its start
        h0 = tl.load(state_base + chunk * dstate, mask=dn_mask, other=0.0)
        hs, x = _chunk_states(dt, u, A, Bt, h0)

        g = _tile(dout_ptr + pid_b * sg_b, channels, t, ld, sg_d, sg_l)
        if HAS_Z:
            y = tl.sum(hs * Ct[:, None, :], axis=2)
            if HAS_D:
                y = y + u * Dv[None, :]
            z = _tile(z_ptr + pid_b * sz_b, channels, t, ld, sz_d, sz_l)
            sig = tl.sigmoid(z)
            tl.store(dz_ptr + grad_base + t[:, None], g * y * sig * (1.0 + z * (1.0 - sig)), mask=ld)
            g = g * z * sig  # the gradient reaching the SSM output
        if HAS_D:
            dD += tl.sum(g * u, axis=0)

        # gh_t = C_t g_t + a_{t+1} gh_{t+1}, scanned from the chunk's end, then the later chunks' share
        decay1 = tl.exp(dt1[:, :, None] * A[None, :, :])
        carried1, local1 = tl.associative_scan((decay1, g[:, :, None] * Ct[:, None, :]), 0, _combine, reverse=True)
        gh = local1 + carried1 * gh_next[None, :, :]
        gh_next = tl.sum(tl.where(rows[:, None, None] == 0, gh, 0.0), axis=0)

        grad_exponent = gh * (hs - x)  # dL/d(delta A): gh_t a_t h_{t-1}
        grad_input = tl.sum(gh * Bt[:, None, :], axis=2)  # dL/d(delta u)
        ddelta = tl.sum(grad_exponent * A[None, :, :], axis=2) + grad_input * u
        du = grad_input * dt
        if HAS_D:
            du = du + g * Dv[None, :]
        if SOFTPLUS:
            ddelta = ddelta * tl.where(raw <= 20.0, tl.sigmoid(raw), 1.0)
        tl.store(du_ptr + grad_base + t[:, None], du, mask=ld)
        tl.store(ddelta_ptr + grad_base + t[:, None], ddelta, mask=ld)
        dA += tl.sum(grad_exponent * dt[:, :, None], axis=0)
        dBt = tl.sum(gh * (dt * u)[:, :, None], axis=1)  # (L, n): this block's channels of the group
        dCt = tl.sum(g[:, :, None] * hs, axis=1)
        offsets = states[None, :] * length + t[:, None]
        tl.atomic_add(dB_base + offsets, dBt, mask=ln)
        tl.atomic_add(dC_base + offsets, dCt, mask=ln)

    tl.store(dA_ptr + (pid_b * dim + channels[:, None]) * dstate + states[None, :], dA, mask=dn_mask)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + channels, dD, mask=channel_ok)


def _block_d(channels_per_group: int, limit: int) -> int:
    """The largest power of two up to `limit` that divides a group's channels (a block never spans groups)."""
    block = 1
    while block * 2 <= limit and channels_per_group % (block * 2) == 0:
        block *= 2
    return block


def _layout(u: Tensor, B: Tensor, block_l: int, block_d: int) -> tuple[int, int, int, int, int, int, int]:
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], B.shape[2]
    channels_per_group = dim // groups
    n_chunks = triton.cdiv(length, block_l)
    return batch, dim, length, groups, dstate, channels_per_group, n_chunks


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_l, block_d):
        A = A.contiguous()
        D = None if D is None else D.contiguous()
        delta_bias = None if delta_bias is None else delta_bias.contiguous()
        batch, dim, length, groups, dstate, per_group, n_chunks = _layout(u, B, block_l, block_d)
        out = torch.empty_like(u)  # u's layout (time-major callers keep theirs)
        saved = torch.empty(batch, dim, n_chunks, dstate, device=u.device, dtype=torch.float32)
        dummy = u  # any tensor stands in for an absent optional input (never read)
        zz = dummy if z is None else z
        grid = (batch, triton.cdiv(dim, block_d))
        _scan_fwd_kernel[grid](
            u,
            delta,
            A,
            B,
            C,
            dummy if D is None else D,
            zz,
            dummy if delta_bias is None else delta_bias,
            out,
            saved,
            length,
            dim,
            dstate,
            per_group,
            n_chunks,
            *u.stride(),
            *delta.stride(),
            *zz.stride(),
            *out.stride(),
            *B.stride(),
            *C.stride(),
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus),
            BLOCK_L=block_l,
            BLOCK_D=block_d,
            BLOCK_N=triton.next_power_of_2(dstate),
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, saved)
        ctx.options = (bool(delta_softplus), block_l, block_d)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, saved = ctx.saved_tensors
        softplus, block_l, block_d = ctx.options
        batch, dim, length, groups, dstate, per_group, n_chunks = _layout(u, B, block_l, block_d)
        f32 = dict(device=u.device, dtype=torch.float32)
        du = torch.empty(batch, dim, length, **f32)
        ddelta = torch.empty(batch, dim, length, **f32)
        dz = torch.empty(batch, dim, length, **f32) if z is not None else du
        dA = torch.empty(batch, dim, dstate, **f32)
        dB = torch.zeros(batch, groups, dstate, length, **f32)
        dC = torch.zeros(batch, groups, dstate, length, **f32)
        dD = torch.empty(batch, dim, **f32) if D is not None else du
        zz = u if z is None else z
        grid = (batch, triton.cdiv(dim, block_d))
        _scan_bwd_kernel[grid](
            u,
            delta,
            A,
            B,
            C,
            u if D is None else D,
            zz,
            u if delta_bias is None else delta_bias,
            dout,
            saved,
            du,
            ddelta,
            dz,
            dA,
            dB,
            dC,
            dD,
            length,
            dim,
            dstate,
            per_group,
            n_chunks,
            groups,
            *u.stride(),
            *delta.stride(),
            *zz.stride(),
            *dout.stride(),
            *B.stride(),
            *C.stride(),
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None,
            SOFTPLUS=softplus,
            BLOCK_L=block_l,
            BLOCK_D=block_d,
            BLOCK_N=triton.next_power_of_2(dstate),
        )
        return (
            du.to(u.dtype),
            ddelta.to(delta.dtype),
            dA.sum(0).to(A.dtype),
            dB.to(B.dtype),
            dC.to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype),
            None if z is None else dz.to(z.dtype),
            None if delta_bias is None else ddelta.sum(dim=(0, 2)).to(delta_bias.dtype),
            None,
            None,
            None,
        )


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    block_l: int = BLOCK_L,
    block_d: int | None = None,
) -> Tensor:
    """y (b, d, L) in u's dtype; differentiable in every tensor input. Any strides (a time-major
    caller passes permuted views and gets its layout back). B, C: (b, n, L) or (b, g, n, L).

    `block_l` (a power of two) steps per chunk; `block_d` channels per program (a power of two
    dividing a group's channels; default the largest such up to MAX_BLOCK_D).
    """
    if not (u.is_cuda or interpreted()):
        raise RuntimeError("the Triton scan needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    grouped = B.dim() == 4
    B4 = B if grouped else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    groups = B4.shape[1]
    dim = u.shape[1]
    if dim % groups or C4.shape[1] != groups:
        raise ValueError(f"B and C need the same number of groups, dividing the {dim} channels")
    per_group = dim // groups
    if block_d is None:
        block_d = _block_d(per_group, MAX_BLOCK_D)
    elif block_d & (block_d - 1) or per_group % block_d:
        raise ValueError(f"block_d={block_d} must be a power of two dividing a group's {per_group} channels")
    if block_l < 1 or block_l & (block_l - 1):
        raise ValueError(f"block_l={block_l} must be a power of two")
    return _SelectiveScan.apply(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, block_l, block_d)
