"""Triton GRU: fused cell / recurrent step forward, fused gate-gradient backward, and one-direction layers.

Layout of this file: four kernels (`_gru_step_fwd_kernel`, `_gru_gates_bwd_kernel`, and `_gru_seq_fwd_kernel` /
`_gru_seq_bwd_kernel`: the same steps for every step of a layer in one launch), four launchers with the torch
backend's signatures and returns (`gru_cell_fwd`, `gru_cell_bwd`, `gru_layer_fwd`, `gru_layer_bwd`) and
`compile_configs()` for the offline compile check (scripts/compile_triton.py).

Math (torch's gate order r | z | n), all in fp32:
    gi = x W_ih^T + b_ih                              (launcher: one torch matmul; all T steps at once for a layer)
    gh = h W_hh^T + b_hh                              (kernel: three tl.dot accumulations over H, BLOCK_K chunks)
    r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), hn = gh_n, n = tanh(gi_n + r * hn)
    h' = n + z * (h - n)                              (= (1 - z) n + z h, the reference's form)
The forward saves the op-contract workspace ws = [r | z | n | hn] (fp32, last dim 4H) when grads are needed.
Backward of one step from dh (= carried dh + dout[t] for a layer, summed in the kernel) and ws:
    dn = dh (1 - z), dz = dh (h - n), dn_pre = dn (1 - n^2), dr_pre = dn_pre hn r (1 - r), dz_pre = dz z (1 - z)
    dgi = [dr_pre | dz_pre | dn_pre], dgh = [dr_pre | dz_pre | dn_pre r], direct = dh z
then (launcher, torch matmuls, deterministic) dh_prev = dgh W_hh + direct, dx = dgi W_ih, dW_ih = dgi^T x,
dW_hh = dgh^T h_prev, db = column sums (for a layer: one matmul / sum over all T * B rows at the end).

Launches: while W_hh takes at most SEQ_MAX_W_BYTES a layer's forward and backward are one launch each for all
steps (a program per 16 batch rows walks every step and hidden block, streaming W_hh from L2 each step; the H200
run measured the launch per step at 27 us, host-bound, for B = 1, H = 128); else per step the forward is one fused
kernel (reading gi[t], writing out[t] and ws[t] in place) and the backward 1 kernel + 1 addmm (dh_prev, written
into a ping-pong fp32 buffer: no per-step allocation). The backward's one-launch kernel computes dh_prev = dgh W_hh
with fp32 tl.dot chunks (another summation order than the addmm).

fp16/bf16: loaded and upcast to fp32 (on a GPU the h W_hh^T dot runs on the half operands with fp32
accumulation: the products are exact, same result up to summation order). The state is rounded to the input
dtype between steps (out[t] is what the next step reads), like the reference. fp32 dots use
input_precision="ieee" (no TF32). tanh(x) = 2 sigmoid(2x) - 1 (libdevice tanh fails in the interpreter).

Standalone: imports only torch and triton (no pyattn imports).
"""

import torch
import triton
import triton.language as tl

from ._common import round_to as _round_to

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _alloc(shape, dtype, device):
    """Every output / scratch buffer of the launchers comes from here (tests patch it to NaN-fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _step_block(GI, HP, W, BHH, OUT, WS, stride_gi, stride_h, stride_w, stride_out, stride_ws, rows, cols, B, H,
                BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BHH: tl.constexpr,
                STORE_WS: tl.constexpr, DOT_NATIVE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """One step for batch rows `rows` (BLOCK_B,) x hidden units `cols` (BLOCK_H,): gh = h W_hh^T (+ b_hh) by three
    tl.dot accumulations over H in BLOCK_K chunks, the gates, h' -> OUT, [r|z|n|hn] -> WS (arguments as in
    _gru_step_fwd_kernel)."""
    rmask = rows < B
    cmask = cols < H
    cols64 = cols.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)

    acc_r = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    h_ptrs = HP + rows[:, None] * stride_h  # (BLOCK_B, 1)
    # W_hh^T chunk (BLOCK_K, BLOCK_H): element (k, j) = W[g*H + j, k]
    w_r_ptrs = W + cols64[None, :] * stride_w
    w_z_ptrs = W + (cols64[None, :] + H) * stride_w
    w_n_ptrs = W + (cols64[None, :] + 2 * H) * stride_w
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        kmask = k < H
        hm = rmask[:, None] & kmask[None, :]
        wm = kmask[:, None] & cmask[None, :]
        h = tl.load(h_ptrs + k[None, :], mask=hm, other=0.0)
        w_r = tl.load(w_r_ptrs + k[:, None], mask=wm, other=0.0)
        w_z = tl.load(w_z_ptrs + k[:, None], mask=wm, other=0.0)
        w_n = tl.load(w_n_ptrs + k[:, None], mask=wm, other=0.0)
        if DOT_NATIVE:
            acc_r = tl.dot(h, w_r, acc_r)
            acc_z = tl.dot(h, w_z, acc_z)
            acc_n = tl.dot(h, w_n, acc_n)
        else:
            hf = h.to(tl.float32)
            acc_r = tl.dot(hf, w_r.to(tl.float32), acc_r, input_precision="ieee")
            acc_z = tl.dot(hf, w_z.to(tl.float32), acc_z, input_precision="ieee")
            acc_n = tl.dot(hf, w_n.to(tl.float32), acc_n, input_precision="ieee")

    if HAS_BHH:
        acc_r += tl.load(BHH + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_z += tl.load(BHH + H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_n += tl.load(BHH + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]

    m2 = rmask[:, None] & cmask[None, :]
    gi_ptrs = GI + rows[:, None] * stride_gi + cols64[None, :]
    gi_r = tl.load(gi_ptrs, mask=m2, other=0.0)
    gi_z = tl.load(gi_ptrs + H, mask=m2, other=0.0)
    gi_n = tl.load(gi_ptrs + 2 * H, mask=m2, other=0.0)
    h_old = tl.load(h_ptrs + cols64[None, :], mask=m2, other=0.0).to(tl.float32)

    r = _sigmoid(gi_r + acc_r)
    z = _sigmoid(gi_z + acc_z)
    n = _tanh(gi_n + r * acc_n)
    h_new = n + z * (h_old - n)
    tl.store(OUT + rows[:, None] * stride_out + cols64[None, :], _round_to(h_new, OUT.dtype.element_ty, SOFT_BF16),
             mask=m2)
    if STORE_WS:
        ws_ptrs = WS + rows[:, None] * stride_ws + cols64[None, :]
        tl.store(ws_ptrs, r, mask=m2)
        tl.store(ws_ptrs + H, z, mask=m2)
        tl.store(ws_ptrs + 2 * H, n, mask=m2)
        tl.store(ws_ptrs + 3 * H, acc_n, mask=m2)


@triton.jit
def _gru_step_fwd_kernel(
    GI,  # (B, 3H) fp32 input projection incl. b_ih, row stride stride_gi
    HP,  # (B, H) previous state (input dtype), row stride stride_h
    W,  # (3H, H) W_hh (input dtype), row stride stride_w
    BHH,  # (3H,) b_hh (dummy unless HAS_BHH)
    OUT,  # (B, H) new state (input dtype), row stride stride_out
    WS,  # (B, 4H) fp32 workspace [r|z|n|hn], row stride stride_ws (dummy unless STORE_WS)
    stride_gi,
    stride_h,
    stride_w,
    stride_out,
    stride_ws,
    B,
    H,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BHH: tl.constexpr,
    STORE_WS: tl.constexpr,
    DOT_NATIVE: tl.constexpr,  # half operands straight into tl.dot (GPU); else upcast to fp32, ieee dot
    SOFT_BF16: tl.constexpr,
):
    # 1-D grid over (batch blocks) x (hidden blocks): no grid y/z limits.
    pid = tl.program_id(0)
    n_h = tl.cdiv(H, BLOCK_H)
    pid_b = pid // n_h
    pid_h = pid % n_h
    rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # (BLOCK_B,)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,) hidden units of this program
    _step_block(GI, HP, W, BHH, OUT, WS, stride_gi, stride_h, stride_w, stride_out, stride_ws, rows, cols, B, H,
                BLOCK_B, BLOCK_H, BLOCK_K, HAS_BHH, STORE_WS, DOT_NATIVE, SOFT_BF16)


@triton.jit
def _gru_seq_fwd_kernel(
    GI,  # (T, B, 3H) fp32 input projections incl. b_ih, strides (stride_gi_t, stride_gi, 1)
    H0,  # (B, H) initial state (input dtype), row stride stride_h0
    W, BHH,  # as _gru_step_fwd_kernel
    OUT,  # (T, B, H) states (input dtype), strides (stride_out_t, stride_out, 1)
    WS,  # (T, B, 4H) fp32 workspace, strides (stride_ws_t, stride_ws, 1) (dummy unless STORE_WS)
    stride_gi_t, stride_gi, stride_h0, stride_w, stride_out_t, stride_out, stride_ws_t, stride_ws,
    T, B, H,
    REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BHH: tl.constexpr,
    STORE_WS: tl.constexpr,
    DOT_NATIVE: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    # Grid: (cdiv(B, BLOCK_B),); one program = BLOCK_B batch rows through every step and every hidden block (a
    # step needs the whole previous state of its rows, which only this program writes): no launch per step. The
    # state goes through OUT: step t reads out[t - 1] (h0 first), which this program's threads wrote before the
    # barrier that ends step t - 1.
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    t0 = T - 1 if REVERSE else 0  # the first step, from h0 (peeled: a pointer chosen at run time spilled)
    _seq_step(GI, H0, W, BHH, OUT, WS, stride_gi_t, stride_gi, stride_h0, stride_w, stride_out_t, stride_out,
              stride_ws_t, stride_ws, t0, rows, B, H, BLOCK_B, BLOCK_H, BLOCK_K, HAS_BHH, STORE_WS, DOT_NATIVE,
              SOFT_BF16)
    for step in range(1, T):
        t = T - 1 - step if REVERSE else step
        hp = OUT + tl.cast(t + 1 if REVERSE else t - 1, tl.int64) * stride_out_t
        _seq_step(GI, hp, W, BHH, OUT, WS, stride_gi_t, stride_gi, stride_out, stride_w, stride_out_t, stride_out,
                  stride_ws_t, stride_ws, t, rows, B, H, BLOCK_B, BLOCK_H, BLOCK_K, HAS_BHH, STORE_WS, DOT_NATIVE,
                  SOFT_BF16)


@triton.jit
def _seq_step(GI, HP, W, BHH, OUT, WS, stride_gi_t, stride_gi, stride_h, stride_w, stride_out_t, stride_out,
              stride_ws_t, stride_ws, t, rows, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_K: tl.constexpr, HAS_BHH: tl.constexpr, STORE_WS: tl.constexpr, DOT_NATIVE: tl.constexpr,
              SOFT_BF16: tl.constexpr):
    """Step t of _gru_seq_fwd_kernel from the state HP (row stride stride_h): every hidden block in turn, then a
    barrier, so that out[t] is whole before the next step reads it."""
    t64 = tl.cast(t, tl.int64)
    for c0 in range(0, H, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        _step_block(GI + t64 * stride_gi_t, HP, W, BHH, OUT + t64 * stride_out_t, WS + t64 * stride_ws_t,
                    stride_gi, stride_h, stride_w, stride_out, stride_ws, rows, cols, B, H,
                    BLOCK_B, BLOCK_H, BLOCK_K, HAS_BHH, STORE_WS, DOT_NATIVE, SOFT_BF16)
    tl.debug_barrier()


@triton.jit
def _gates_bwd_block(DHC, DOUT, HP, WS, DGI, DGH, DHD, stride_dhc, stride_dout, stride_h, stride_ws, stride_dgi,
                     stride_dgh, stride_dhd, rows, cols, B, H, HAS_DOUT: tl.constexpr):
    """The gate gradients of batch rows `rows` x hidden units `cols` (int64; arguments as in _gru_gates_bwd_kernel).
    DHD may be DHC (each element is read before it is written, by the same thread)."""
    m = (rows < B)[:, None] & (cols < H)[None, :]
    r2 = rows[:, None]
    c2 = cols[None, :]

    dh = tl.load(DHC + r2 * stride_dhc + c2, mask=m, other=0.0).to(tl.float32)
    if HAS_DOUT:
        dh = dh + tl.load(DOUT + r2 * stride_dout + c2, mask=m, other=0.0).to(tl.float32)
    h = tl.load(HP + r2 * stride_h + c2, mask=m, other=0.0).to(tl.float32)
    ws = WS + r2 * stride_ws + c2
    r = tl.load(ws, mask=m, other=0.0)
    z = tl.load(ws + H, mask=m, other=0.0)
    n = tl.load(ws + 2 * H, mask=m, other=0.0)
    hn = tl.load(ws + 3 * H, mask=m, other=0.0)

    dn = dh * (1 - z)
    dz = dh * (h - n)
    dn_pre = dn * (1 - n * n)
    dr_pre = dn_pre * hn * r * (1 - r)
    dz_pre = dz * z * (1 - z)

    dgi = DGI + r2 * stride_dgi + c2
    tl.store(dgi, dr_pre, mask=m)
    tl.store(dgi + H, dz_pre, mask=m)
    tl.store(dgi + 2 * H, dn_pre, mask=m)
    dgh = DGH + r2 * stride_dgh + c2
    tl.store(dgh, dr_pre, mask=m)
    tl.store(dgh + H, dz_pre, mask=m)
    tl.store(dgh + 2 * H, dn_pre * r, mask=m)
    tl.store(DHD + r2 * stride_dhd + c2, dh * z, mask=m)


@triton.jit
def _gru_gates_bwd_kernel(
    DHC,  # (B, H) carried dL/dh' (fp32 for a layer, input dtype for a cell), row stride stride_dhc
    DOUT,  # (B, H) dL/dout[t] (input dtype), added to DHC (dummy unless HAS_DOUT)
    HP,  # (B, H) previous state (input dtype)
    WS,  # (B, 4H) fp32 [r|z|n|hn]
    DGI,  # (B, 3H) fp32 out
    DGH,  # (B, 3H) fp32 out
    DHD,  # (B, H) fp32 out: dh * z (direct term of dh_prev)
    stride_dhc,
    stride_dout,
    stride_h,
    stride_ws,
    stride_dgi,
    stride_dgh,
    stride_dhd,
    B,
    H,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_DOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    n_h = tl.cdiv(H, BLOCK_H)
    pid_b = pid // n_h
    pid_h = pid % n_h
    rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = (pid_h * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    _gates_bwd_block(DHC, DOUT, HP, WS, DGI, DGH, DHD, stride_dhc, stride_dout, stride_h, stride_ws, stride_dgi,
                     stride_dgh, stride_dhd, rows, cols, B, H, HAS_DOUT)


@triton.jit
def _gru_seq_bwd_kernel(
    DH,  # (B, H) fp32 contiguous: dL/dh_T at launch (zeros for none), dL/dh0 at the end; d z between the phases
    DOUT,  # (T, B, H) dL/dout (input dtype), strides (stride_dout_t, stride_dout, 1)
    HP,  # (T, B, H) the state each step started from (input dtype), strides (stride_hp_t, stride_hp, 1)
    WS,  # (T, B, 4H) fp32 [r|z|n|hn], strides (stride_ws_t, stride_ws, 1)
    W,  # (3H, H) W_hh (input dtype), row stride stride_w
    DGI, DGH,  # (T, B, 3H) fp32 out, strides (stride_g_t, stride_g, 1)
    stride_dout_t, stride_dout, stride_hp_t, stride_hp, stride_ws_t, stride_ws, stride_w, stride_g_t, stride_g,
    T, B, H,
    REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Grid: (cdiv(B, BLOCK_B),); one program = BLOCK_B batch rows through every step (last processed first): phase
    # A, the gate gradients of every hidden block (dh + dout[t] -> dgi[t], dgh[t], dh = d z); a barrier; phase B,
    # dh += dgh[t] W_hh (fp32 dots over 3H in BLOCK_K chunks) per hidden block; a barrier. Only this program
    # touches its rows of DH, DGI and DGH.
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rmask = rows < B
    ks = tl.arange(0, BLOCK_K)
    for step in range(0, T):
        t64 = tl.cast(step if REVERSE else T - 1 - step, tl.int64)
        dgh_t = DGH + t64 * stride_g_t
        for c0 in range(0, H, BLOCK_H):
            cols = (c0 + tl.arange(0, BLOCK_H)).to(tl.int64)
            _gates_bwd_block(DH, DOUT + t64 * stride_dout_t, HP + t64 * stride_hp_t, WS + t64 * stride_ws_t,
                             DGI + t64 * stride_g_t, dgh_t, DH, H, stride_dout, stride_hp, stride_ws, stride_g,
                             stride_g, H, rows, cols, B, H, True)
        tl.debug_barrier()  # dgh[t] of every hidden block, and d z, before phase B reads them
        for c0 in range(0, H, BLOCK_H):
            cols = (c0 + tl.arange(0, BLOCK_H)).to(tl.int64)
            cmask = cols < H
            acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
            for k0 in range(0, 3 * H, BLOCK_K):
                k = k0 + ks
                kmask = k < 3 * H
                g = tl.load(dgh_t + rows[:, None] * stride_g + k[None, :], mask=rmask[:, None] & kmask[None, :],
                            other=0.0)
                w = tl.load(W + k[:, None].to(tl.int64) * stride_w + cols[None, :],
                            mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                acc = tl.dot(g, w, acc, input_precision="ieee")
            d_ptrs = DH + rows[:, None] * H + cols[None, :]
            m = rmask[:, None] & cmask[None, :]
            tl.store(d_ptrs, tl.load(d_ptrs, mask=m, other=0.0) + acc, mask=m)
        tl.debug_barrier()  # dh_prev whole before the next step's phase A


# --------------------------------------------------------------------------------------------------
# Launch configurations (shared by the launchers and compile_configs)
# --------------------------------------------------------------------------------------------------

# Forward step kernel: (BLOCK_B, BLOCK_H, BLOCK_K, num_warps). BLOCK_B >= 16 (tl.dot minimum).
_FWD_SMALL_B = (16, 32, 64, 4)  # B <= 16: narrow hidden blocks -> more programs for a small batch
_FWD_LARGE_B = (32, 64, 32, 8)  # 8 warps: the fp32 (FMA, no TF32) dots spill at 4 on sm_80
_FWD_INTERP = (32, 64, 64, 4)  # the interpreter runs programs one by one: few large programs
# Sequence kernel (every step in one launch): 16 batch rows a program (more programs for a batch), hidden blocks
# of 32 in turn
_SEQ_CFG = (16, 32, 64, 4)
_SEQ_BWD_CFG = (16, 32, 32, 4)  # (fp32 dots: dgh is fp32)
_SEQ_CFG_F32 = (16, 32, 16, 4)  # (fp32: FMA dots; BLOCK_K 32 and 64 spill on sm_80 / sm_90a)
# Gate backward (elementwise): (BLOCK_B, BLOCK_H, num_warps)
_BWD_CFG = (16, 128, 4)
_BWD_INTERP = (32, 64, 4)


def _fwd_config(B: int, device: torch.device):
    if device.type != "cuda":
        return _FWD_INTERP
    return _FWD_SMALL_B if B <= 16 else _FWD_LARGE_B


def _bwd_config(device: torch.device):
    return _BWD_CFG if device.type == "cuda" else _BWD_INTERP


class _NoDeviceGuard:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _NoDeviceGuard()


def _unit(t):
    if t is None:
        return None
    return t if (t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1) else t.contiguous()


def _check(x, w_ih, w_hh):
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"pyattn Triton gru: unsupported dtype {x.dtype} (float32, float16, bfloat16)")
    if w_ih.dtype != x.dtype or w_hh.dtype != x.dtype:
        raise ValueError(f"pyattn Triton gru: weight dtypes {w_ih.dtype}/{w_hh.dtype} != input dtype {x.dtype}")


def _linear_f32(x2d, w, b):
    """x (N, I) @ w^T (+ b) in fp32: one GEMM (the reference's _linear for fp32/fp16/bf16 inputs)."""
    y = torch.matmul(x2d.to(torch.float32), w.to(torch.float32).t())
    return y if b is None else y + b.to(torch.float32)


def _step_consts(h, b_hh, needs_grad) -> dict:
    """The forward kernels' flags for state h (B, H): b_hh present, workspace stored, native 16-bit dots on a GPU,
    bf16 rounding in software under the interpreter."""
    return {"HAS_BHH": b_hh is not None, "STORE_WS": bool(needs_grad),
            "DOT_NATIVE": bool(h.is_cuda and h.dtype != torch.float32), "SOFT_BF16": not h.is_cuda}


def _launch_step_fwd(gi, hp, w_hh, b_hh, out, ws, needs_grad):
    """One fused recurrent step: gi (B, 3H) fp32, hp (B, H) -> out (B, H), ws (B, 4H) in place."""
    B, H = hp.shape
    bb, bh, bk, nw = _fwd_config(B, hp.device)
    grid = (triton.cdiv(B, bb) * triton.cdiv(H, bh),)
    _gru_step_fwd_kernel[grid](
        gi, hp, w_hh,
        b_hh if b_hh is not None else w_hh,
        out,
        ws if needs_grad else out,
        gi.stride(0), hp.stride(0), w_hh.stride(0), out.stride(0), ws.stride(0) if needs_grad else 0,
        B, H,
        BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk,
        **_step_consts(hp, b_hh, needs_grad),
        num_warps=nw,
    )


# A layer's forward and backward run every step in one launch (_gru_seq_*_kernel, a program per 16 batch rows) when
# W_hh is at most this size: each program streams all of W_hh from L2 at every step, which beats a launch per step
# (tens of us of host time each) while W_hh is small; larger layers take a launch per step, spread over hidden blocks.
SEQ_MAX_W_BYTES = 1 << 20


def _one_launch(w_hh) -> bool:
    """A layer's forward and backward run every step in one launch (W_hh within SEQ_MAX_W_BYTES)."""
    return w_hh.numel() * w_hh.element_size() <= SEQ_MAX_W_BYTES


def _launch_seq_fwd(gi, h0, w_hh, b_hh, out, ws, reverse, needs_grad):
    """Every step of a layer: gi (T, B, 3H) fp32, h0 (B, H) -> out (T, B, H), ws (T, B, 4H) in place."""
    T, B, H = out.shape
    bb, bh, bk, nw = (_SEQ_CFG_F32 if h0.dtype == torch.float32 else _SEQ_CFG) if h0.is_cuda else _FWD_INTERP
    _gru_seq_fwd_kernel[(triton.cdiv(B, bb),)](
        gi, h0, w_hh,
        b_hh if b_hh is not None else w_hh,
        out,
        ws if needs_grad else out,
        gi.stride(0), gi.stride(1), h0.stride(0), w_hh.stride(0), out.stride(0), out.stride(1),
        ws.stride(0) if needs_grad else 0, ws.stride(1) if needs_grad else 0,
        T, B, H,
        REVERSE=bool(reverse),
        BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk,
        **_step_consts(h0, b_hh, needs_grad),
        num_warps=nw,
    )


def _launch_seq_bwd(dh, dout, h_prev, ws, w_hh, dgi, dgh, reverse):
    """Every step of a layer's backward: dh (B, H) fp32 contiguous in place (dL/dh_T in, dL/dh0 out), dgi / dgh
    (T, B, 3H) fp32 filled."""
    T, B, H = dout.shape
    bb, bh, bk, nw = _SEQ_BWD_CFG if dh.is_cuda else _FWD_INTERP
    _gru_seq_bwd_kernel[(triton.cdiv(B, bb),)](
        dh, dout, h_prev, ws, w_hh, dgi, dgh,
        dout.stride(0), dout.stride(1), h_prev.stride(0), h_prev.stride(1), ws.stride(0), ws.stride(1),
        w_hh.stride(0), dgi.stride(0), dgi.stride(1),
        T, B, H,
        REVERSE=bool(reverse), BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk,
        num_warps=nw,
    )


def _launch_gates_bwd(dhc, dout, hp, ws, dgi, dgh, dhd):
    B, H = hp.shape
    bb, bh, nw = _bwd_config(hp.device)
    grid = (triton.cdiv(B, bb) * triton.cdiv(H, bh),)
    _gru_gates_bwd_kernel[grid](
        dhc, dout if dout is not None else dhc, hp, ws, dgi, dgh, dhd,
        dhc.stride(0), dout.stride(0) if dout is not None else 0, hp.stride(0), ws.stride(0),
        dgi.stride(0), dgh.stride(0), dhd.stride(0),
        B, H,
        BLOCK_B=bb, BLOCK_H=bh, HAS_DOUT=dout is not None,
        num_warps=nw,
    )


def _weight_grads(dgi, dgh, xs, hs, w, has_b_ih, has_b_hh, need_weights):
    """The reference's weight grads: dgi/dgh (N, 3H) fp32, xs (N, I), hs (N, H) -> dw_ih, dw_hh, db_ih, db_hh
    in w.dtype (empty when not asked for)."""
    wdt = w.dtype
    if not need_weights:  # four distinct empty tensors: custom op outputs must not alias each other
        return tuple(w.new_empty(0) for _ in range(4))
    dw_ih = torch.matmul(dgi.t(), xs.to(torch.float32)).to(wdt)
    dw_hh = torch.matmul(dgh.t(), hs.to(torch.float32)).to(wdt)
    db_ih = dgi.sum(0).to(wdt) if has_b_ih else w.new_empty(0)
    db_hh = dgh.sum(0).to(wdt) if has_b_hh else w.new_empty(0)
    return dw_ih, dw_hh, db_ih, db_hh


# --------------------------------------------------------------------------------------------------
# Launchers (same signatures and returns as pyattn.backends.torch.TorchBackend's GRU methods)
# --------------------------------------------------------------------------------------------------


def gru_cell_fwd(x, hx, w_ih, w_hh, b_ih, b_hh, needs_grad):
    """x (B, I), hx (B, H) -> h_new (B, H) in x.dtype, ws (B, 4H) fp32 or empty. One GEMM for gi + one fused
    kernel launch."""
    _check(x, w_ih, w_hh)
    x, hx, w_ih, w_hh, b_ih, b_hh = (_unit(t) for t in (x, hx, w_ih, w_hh, b_ih, b_hh))
    B, H = hx.shape
    dev = x.device
    out = _alloc((B, H), x.dtype, dev)
    ws = _alloc((B, 4 * H) if needs_grad else (0,), torch.float32, dev)
    if B == 0 or H == 0:
        return out, ws
    with torch.no_grad(), _device_guard(x):
        gi = _linear_f32(x, w_ih, b_ih)
        _launch_step_fwd(gi, hx, w_hh, b_hh, out, ws, needs_grad)
    return out, ws


def gru_cell_bwd(dh, x, hx, w_ih, w_hh, ws, has_b_ih, has_b_hh, need_weights):
    """-> dx (B, I), dhx (B, H), dw_ih (3H, I), dw_hh (3H, H), db_ih (3H), db_hh (3H) (weight grads empty
    when not need_weights, a bias grad empty when that bias is absent). One fused gate-gradient launch, then
    torch matmuls."""
    _check(x, w_ih, w_hh)
    dh, x, hx, w_ih, w_hh, ws = (_unit(t) for t in (dh, x, hx, w_ih, w_hh, ws))
    B, H = hx.shape
    dev = x.device
    with torch.no_grad(), _device_guard(x):
        dgi = _alloc((B, 3 * H), torch.float32, dev)
        dgh = _alloc((B, 3 * H), torch.float32, dev)
        dhd = _alloc((B, H), torch.float32, dev)
        if B > 0 and H > 0:
            _launch_gates_bwd(dh, None, hx, ws, dgi, dgh, dhd)
        else:
            dgi.zero_(), dgh.zero_(), dhd.zero_()
        dx = torch.matmul(dgi, w_ih.to(torch.float32))
        dhx = torch.addmm(dhd, dgh, w_hh.to(torch.float32))
        weights = _weight_grads(dgi, dgh, x, hx, w_ih, has_b_ih, has_b_hh, need_weights)
    return (dx.to(x.dtype), dhx.to(hx.dtype), *weights)


def gru_layer_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, needs_grad):
    """One direction of one layer. x (T, B, I), h0 (B, H) -> out (T, B, H), h_T (B, H) (x.dtype), ws (T, B,
    4H) fp32 or empty. One GEMM for every step's input projection, then one fused kernel launch per step
    writing out[t] and ws[t] in place."""
    _check(x, w_ih, w_hh)
    x, h0, w_ih, w_hh, b_ih, b_hh = (_unit(t) for t in (x, h0, w_ih, w_hh, b_ih, b_hh))
    t_len, B, isz = x.shape
    H = w_hh.shape[1]
    dev = x.device
    out = _alloc((t_len, B, H), x.dtype, dev)
    ws = _alloc((t_len, B, 4 * H) if needs_grad else (0,), torch.float32, dev)
    if t_len == 0 or B == 0 or H == 0:
        return out, h0.clone(), ws
    with torch.no_grad(), _device_guard(x):
        gi = _linear_f32(x.reshape(t_len * B, isz), w_ih, b_ih).view(t_len, B, 3 * H)
        if _one_launch(w_hh):
            _launch_seq_fwd(gi, h0, w_hh, b_hh, out, ws, reverse, needs_grad)
            h = out[0] if reverse else out[t_len - 1]
        else:
            h = h0
            for t in range(t_len - 1, -1, -1) if reverse else range(t_len):
                _launch_step_fwd(gi[t], h, w_hh, b_hh, out[t], ws[t] if needs_grad else ws, needs_grad)
                h = out[t]
        h_last = h.clone()  # never aliases out or h0
    return out, h_last, ws


def gru_layer_bwd(dout, dh_last, x, h0, w_ih, w_hh, out, ws, has_b_ih, has_b_hh, reverse, need_weights):
    """BPTT -> dx (T, B, I), dh0 (B, H), dw_ih, dw_hh, db_ih, db_hh. Every step in one launch while W_hh fits
    SEQ_MAX_W_BYTES (_gru_seq_bwd_kernel), else per step (reverse processing order) one fused gate-gradient launch
    (adds dout[t] to the carried dh) + one addmm for dh_prev; dx and the weight grads are one matmul / sum each
    over all T * B rows at the end."""
    _check(x, w_ih, w_hh)
    dout, dh_last, x, h0, w_ih, w_hh, out, ws = (_unit(t) for t in (dout, dh_last, x, h0, w_ih, w_hh, out, ws))
    t_len, B, isz = x.shape
    H = w_hh.shape[1]
    dev = x.device
    with torch.no_grad(), _device_guard(x):
        if t_len == 0 or B == 0 or H == 0:  # the op routes these to the torch backend; kept correct anyway
            dx = torch.zeros(x.shape, dtype=x.dtype, device=dev)
            weights = _weight_grads(torch.zeros(0, 3 * H, device=dev), torch.zeros(0, 3 * H, device=dev),
                                    x.reshape(0, isz), h0.reshape(0, H), w_ih, has_b_ih, has_b_hh, need_weights)
            return (dx, dh_last.to(h0.dtype, copy=True), *weights)
        # h_prev[t]: the state step t started from (the step before it in processing order, or h0)
        if reverse:
            h_prev = torch.cat([out[1:], h0[None]], 0)
        else:
            h_prev = torch.cat([h0[None], out[:-1]], 0)
        dgi_all = _alloc((t_len, B, 3 * H), torch.float32, dev)
        dgh_all = _alloc((t_len, B, 3 * H), torch.float32, dev)
        dh = dh_last.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # the carried dL/dh
        if _one_launch(w_hh):
            _launch_seq_bwd(dh, dout, h_prev, ws, w_hh, dgi_all, dgh_all, reverse)
        else:
            dhd = _alloc((B, H), torch.float32, dev)
            whh = w_hh.to(torch.float32)
            for t in range(t_len) if reverse else range(t_len - 1, -1, -1):
                _launch_gates_bwd(dh, dout[t], h_prev[t], ws[t], dgi_all[t], dgh_all[t], dhd)
                torch.addmm(dhd, dgh_all[t], whh, out=dh)  # dh_prev = dgh W_hh + dh z
        n = t_len * B
        dgi2 = dgi_all.view(n, 3 * H)
        dx = torch.matmul(dgi2, w_ih.to(torch.float32)).view(t_len, B, isz)
        weights = _weight_grads(dgi2, dgh_all.view(n, 3 * H), x.reshape(n, isz), h_prev.reshape(n, H), w_ih,
                                has_b_ih, has_b_hh, need_weights)
    return (dx.to(x.dtype), dh.to(h0.dtype), *weights)


# --------------------------------------------------------------------------------------------------
# Offline compile check (scripts/compile_triton.py)
# --------------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_configs(full: bool = False):
    """(kernel_fn, signature, constexprs, num_warps) for every shipped GPU configuration: the forward step
    kernel with both GPU tile configs and the sequence kernel with its one, x fp32/fp16/bf16 x (bias, workspace)
    flags (full: every flag combination; default: all on and all off; the sequence kernel reversed with the
    workspace), the sequence backward kernel, and the gate backward kernel x state dtypes x HAS_DOUT."""
    idx = "i32"
    configs = []
    flag_sets = [(b, s) for b in (False, True) for s in (False, True)] if full else [(True, True), (False, False)]
    for dt in _SUPPORTED_DTYPES:
        t = _TRITON_DTYPE[dt]
        for bb, bh, bk, nw in (_FWD_SMALL_B, _FWD_LARGE_B):
            for has_b, store in flag_sets:
                sig = {
                    "GI": "*fp32", "HP": f"*{t}", "W": f"*{t}", "BHH": f"*{t}", "OUT": f"*{t}", "WS": "*fp32",
                    "stride_gi": idx, "stride_h": idx, "stride_w": idx, "stride_out": idx, "stride_ws": idx,
                    "B": "i32", "H": "i32",
                }
                consts = {"BLOCK_B": bb, "BLOCK_H": bh, "BLOCK_K": bk, "HAS_BHH": has_b, "STORE_WS": store,
                          "DOT_NATIVE": dt != torch.float32, "SOFT_BF16": False}
                sig.update({k: "constexpr" for k in consts})
                configs.append((_gru_step_fwd_kernel, sig, consts, nw))
        bb, bh, bk, nw = _SEQ_CFG_F32 if dt == torch.float32 else _SEQ_CFG
        for has_b, store in flag_sets:
            sig = {
                "GI": "*fp32", "H0": f"*{t}", "W": f"*{t}", "BHH": f"*{t}", "OUT": f"*{t}", "WS": "*fp32",
                "stride_gi_t": idx, "stride_gi": idx, "stride_h0": idx, "stride_w": idx, "stride_out_t": idx,
                "stride_out": idx, "stride_ws_t": idx, "stride_ws": idx, "T": "i32", "B": "i32", "H": "i32",
            }
            consts = {"REVERSE": store, "BLOCK_B": bb, "BLOCK_H": bh, "BLOCK_K": bk, "HAS_BHH": has_b,
                      "STORE_WS": store, "DOT_NATIVE": dt != torch.float32, "SOFT_BF16": False}
            sig.update({k: "constexpr" for k in consts})
            configs.append((_gru_seq_fwd_kernel, sig, consts, nw))
        bb, bh, bk, nw = _SEQ_BWD_CFG
        for reverse in (False, True) if full else (True,):
            sig = {"DH": "*fp32", "DOUT": f"*{t}", "HP": f"*{t}", "WS": "*fp32", "W": f"*{t}", "DGI": "*fp32",
                   "DGH": "*fp32", "stride_dout_t": idx, "stride_dout": idx, "stride_hp_t": idx, "stride_hp": idx,
                   "stride_ws_t": idx, "stride_ws": idx, "stride_w": idx, "stride_g_t": idx, "stride_g": idx,
                   "T": "i32", "B": "i32", "H": "i32"}
            consts = {"REVERSE": reverse, "BLOCK_B": bb, "BLOCK_H": bh, "BLOCK_K": bk}
            sig.update({k: "constexpr" for k in consts})
            configs.append((_gru_seq_bwd_kernel, sig, consts, nw))
        bb, bh, nw = _BWD_CFG
        # layer: fp32 carried dh + dout in the input dtype; cell: dh in the input dtype, no dout
        for dhc_t, has_dout in (("fp32", True), (t, False)):
            sig = {
                "DHC": f"*{dhc_t}", "DOUT": f"*{t}", "HP": f"*{t}", "WS": "*fp32", "DGI": "*fp32", "DGH": "*fp32",
                "DHD": "*fp32", "stride_dhc": idx, "stride_dout": idx, "stride_h": idx, "stride_ws": idx,
                "stride_dgi": idx, "stride_dgh": idx, "stride_dhd": idx, "B": "i32", "H": "i32",
            }
            consts = {"BLOCK_B": bb, "BLOCK_H": bh, "HAS_DOUT": has_dout}
            sig.update({k: "constexpr" for k in consts})
            configs.append((_gru_gates_bwd_kernel, sig, consts, nw))
    return configs
