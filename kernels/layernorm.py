"""Triton LayerNorm / RMSNorm, forward and backward, with an optional fused residual ("Add & Norm").

Layout of this file: three kernels (forward, backward, partial-sum reduction for dweight/dbias),
two launchers (`layer_norm_fwd`, `layer_norm_bwd`) and `compile_configs()` for the offline compile
check (scripts/compile_triton.py).

Math, per row of s = x (+ residual, rounded to x.dtype), all in fp32:
    LayerNorm: mean = sum(s) / N, var = sum((s - mean)^2) / N, rstd = 1 / sqrt(var + eps)
               xhat = (s - mean) * rstd, y = xhat * w + b
               (computed as the corrected two-pass of the CUDA and CPU kernels: m1 = sum(s) / N,
               c = mean(s - m1), var = mean((s - m1)^2) - c^2, xhat = (s - m1) * rstd - c * rstd, stored
               mean = m1 + c; accurate for rows far from 0, e.g. +1000 offsets)
    RMSNorm:   rstd = 1 / sqrt(sum(s^2) / N + eps), xhat = s * rstd, y = xhat * w
    Backward (wdy = w * dy):
               dx = rstd * (wdy - xhat * mean(xhat * wdy) - mean(wdy))   [RMSNorm: no mean(wdy) term]
               dw = sum_rows(dy * xhat), db = sum_rows(dy)

A row of up to _MAX_FUSED_BLOCK_N_FWD (forward) / _MAX_FUSED_BLOCK_N_BWD (backward) elements is held in
registers (one load per input element). Longer rows (up to MAX_HIDDEN_SIZE) are processed in chunks of
_CHUNK_N columns with several passes over the row, because a 65536-wide fp32 row would need the whole
register file of an SM (spills); the compile check (scripts/compile_triton.py) keeps every shipped
configuration spill-free.

dweight/dbias are deterministic: backward program p owns a fixed block of rows and writes its fp32
column sums to row p of a (P, N) partial buffer; a second kernel sums the P partial rows in a fixed
order. No atomics, no locks: the result is bitwise reproducible for a given device.

Both kernels run a grid of about the programs the SMs hold at once, each program walking rows (the
forward rows p, p + P, ...; the backward a contiguous block, for its partial sums). A program taking its
rows one after another would wait a full memory round trip per row with nothing else in flight (the H200
timed the bf16 backward at 0.385 ms for M = N = 4096, 5x torch's; the forward, then one program per row,
at 53% of PEAK_COPY). So the single-block row loops are `tl.range(..., num_stages=3)`: Triton's pipeliner
turns their loads into cp.async copies two rows ahead into shared memory (SASS: LDGSTS, then `DEPBAR.LE
SB0, 0x2` (forward) / `0x5` (backward) at the loop top: the next row's copies stay in flight while this row
is computed); 2 stages gave one buffer refilled after the compute, no overlap. Shared memory: 2 buffers of
the row's inputs (forward x and residual, backward dy, s and w; at most 96 KB, fp32 N = 4096). The forward
loads weight and bias once per program instead of once per row, up to N = 4096; its N = 8192 block (16
elements a thread at the 64-register cap) keeps a plain row loop. Unmeasured on a GPU so far
(benchmarks/results/nvidia-h200/NOTES.md says what the next GPU run should time).

Standalone: imports only torch, triton and math (no pyattn imports).
"""

import math

import torch
import triton
import triton.language as tl

from ._common import round_to as _round_to

MAX_HIDDEN_SIZE = 65536  # largest supported N (hidden size)
# Rows up to this width stay in registers; wider rows are processed in chunks of this width. The backward
# keeps more row-sized values live (dy, s, w and two column accumulators), so its limit is lower.
_MAX_FUSED_BLOCK_N_FWD = 8192
_MAX_FUSED_BLOCK_N_BWD = 4096
_CHUNK_N = 4096  # chunk width for wider rows (both kernels; the multi-pass loops keep more values live)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# dweight/dbias reduction kernel tile: (_RED_BLOCK_P partial rows) x (_RED_BLOCK_N columns) per step.
_RED_BLOCK_P = 16
_RED_BLOCK_N = 128
_RED_NUM_WARPS = 4


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_s(X, R, cols, mask, HAS_RESIDUAL: tl.constexpr, SOFT_BF16: tl.constexpr):
    """s = x (+ r) as fp32; with a residual the fp32 sum is rounded to x's dtype first (matches
    torch's unfused `x + r`). Masked lanes are 0. X and R already point at the row start."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
        x = _round_to(x + r, X.dtype.element_ty, SOFT_BF16).to(tl.float32)
    return x


@triton.jit
def _load_params(W, B, cols, mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(w, b) at cols as fp32 (0 past N); a dummy 0 for an absent one (_normalize_store ignores it)."""
    w = tl.zeros(cols.shape, dtype=tl.float32)
    b = tl.zeros(cols.shape, dtype=tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def _normalize_store(
    Y,  # (N,) output row
    w,  # (BLOCK_N,) fp32 weight at cols (ignored unless HAS_WEIGHT)
    b,  # (BLOCK_N,) fp32 bias at cols (ignored unless HAS_BIAS)
    s,  # (BLOCK_N,) fp32 block of the row's input
    m1,  # first estimate of the row mean (0 for RMSNorm)
    ncr,  # -c * rstd, c = mean(s - m1) the estimate's correction (0 for RMSNorm)
    rstd,
    cols,  # (BLOCK_N,) column indices of the block
    mask,  # (BLOCK_N,) cols < N
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """y = ((s - m1) * rstd - c * rstd) * w + b, stored in Y's dtype. Y already points at the row start."""
    if IS_RMS:
        y = s * rstd
    else:
        y = (s - m1) * rstd + ncr
    if HAS_WEIGHT:
        y = y * w
    if HAS_BIAS:
        y = y + b
    tl.store(Y + cols, _round_to(y, Y.dtype.element_ty, SOFT_BF16), mask=mask)


@triton.jit
def _fwd_row(X, R, Y, RO, W, B, Mean, Rstd, w, b, row64, stride_x_row, stride_r_row, stride_y_row, stride_ro_row, N,
             eps, cols, mask, PARAMS_GIVEN: tl.constexpr, IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
             STORE_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SOFT_BF16: tl.constexpr):
    """One row held in one BLOCK_N block: s, its statistics, y, mean / rstd. Weight and bias: w, b (fp32 at cols)
    when PARAMS_GIVEN, else loaded from W, B once the statistics are known (fewer registers live)."""
    s = _load_s(X + row64 * stride_x_row, R + row64 * stride_r_row, cols, mask, HAS_RESIDUAL, SOFT_BF16)
    if STORE_RESIDUAL:
        tl.store(RO + row64 * stride_ro_row + cols, s.to(RO.dtype.element_ty), mask=mask)
    if IS_RMS:
        m1 = 0.0
        c = 0.0
        var = tl.sum(s * s, axis=0) / N
    else:
        # Corrected two-pass (the CUDA and CPU kernels' algorithm): m1's rounding (a sum of N values near +1000
        # loses ~N * ulp(1000) on the GPU's tree sum) comes back as c = mean(s - m1), which is exact to fp32 because
        # s - m1 is.
        m1 = tl.sum(s, axis=0) / N
        d = tl.where(mask, s - m1, 0.0)
        c = tl.sum(d, axis=0) / N
        var = tl.sum(d * d, axis=0) / N - c * c
        var = tl.where(var < 0.0, 0.0, var)  # rounding can leave it just under 0; NaN stays NaN
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    if not PARAMS_GIVEN:
        w, b = _load_params(W, B, cols, mask, HAS_WEIGHT, HAS_BIAS)
    _normalize_store(Y + row64 * stride_y_row, w, b, s, m1, -c * rstd, rstd, cols, mask, IS_RMS, HAS_WEIGHT,
                     HAS_BIAS, SOFT_BF16)
    if not IS_RMS:
        tl.store(Mean + row64, m1 + c)
    tl.store(Rstd + row64, rstd)


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) input, row stride stride_x_row, last stride 1
    R,  # (M, N) residual, row stride stride_r_row (dummy unless HAS_RESIDUAL)
    Y,  # (M, N) output, row stride stride_y_row
    RO,  # (M, N) residual_out = x + residual, row stride stride_ro_row (dummy unless STORE_RESIDUAL)
    W,  # (N,) weight (dummy unless HAS_WEIGHT)
    B,  # (N,) bias (dummy unless HAS_BIAS)
    Mean,  # (M,) fp32 row means (dummy when IS_RMS)
    Rstd,  # (M,) fp32 row 1/std
    stride_x_row,
    stride_r_row,
    stride_y_row,
    stride_ro_row,
    M,  # rows
    N,  # hidden size
    eps,
    BLOCK_N: tl.constexpr,  # power of 2; >= N when SINGLE_CHUNK, else the chunk width
    SINGLE_CHUNK: tl.constexpr,  # the whole row fits one BLOCK_N block (kept in registers)
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    STORE_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # exact bf16 rounding in the CPU interpreter (see _round_to)
):
    # Program p takes rows p, p + P, ... (P = the grid: about the programs the SMs hold at once, so a program has
    # several rows). The row counter is i32 (M < 2^31, checked by the launcher); addresses use int64.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_CHUNK:
        mask = cols < N
        if BLOCK_N <= 4096:
            # Weight and bias once a program, kept in registers (8 elements a thread, _fwd_num_warps). num_stages=3:
            # Triton's pipeliner streams the x (and residual) rows two iterations ahead into shared memory with
            # cp.async, as in the backward (module docstring).
            w, b = _load_params(W, B, cols, mask, HAS_WEIGHT, HAS_BIAS)
            for row in tl.range(pid, M, num_programs, num_stages=3):
                _fwd_row(X, R, Y, RO, W, B, Mean, Rstd, w, b, tl.cast(row, tl.int64), stride_x_row, stride_r_row,
                         stride_y_row, stride_ro_row, N, eps, cols, mask, True, IS_RMS, HAS_RESIDUAL, STORE_RESIDUAL,
                         HAS_WEIGHT, HAS_BIAS, SOFT_BF16)
        else:
            # 16 elements a thread: held across rows, weight and bias spill at the 64-register cap, and pipelining
            # would stage them too (196 KB of shared memory at fp32): a plain loop, the parameters loaded per row
            # after its statistics (as one program per row did).
            for row in range(pid, M, num_programs):
                _fwd_row(X, R, Y, RO, W, B, Mean, Rstd, 0.0, 0.0, tl.cast(row, tl.int64), stride_x_row, stride_r_row,
                         stride_y_row, stride_ro_row, N, eps, cols, mask, False, IS_RMS, HAS_RESIDUAL, STORE_RESIDUAL,
                         HAS_WEIGHT, HAS_BIAS, SOFT_BF16)
    else:
        for row in range(pid, M, num_programs):
            row64 = tl.cast(row, tl.int64)
            x_row = X + row64 * stride_x_row
            r_row = R + row64 * stride_r_row
            # Pass 1: sum(s) (LayerNorm) or sum(s^2) (RMSNorm); residual_out is written here.
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                m = c < N
                s = _load_s(x_row, r_row, c, m, HAS_RESIDUAL, SOFT_BF16)
                if STORE_RESIDUAL:
                    tl.store(RO + row64 * stride_ro_row + c, s.to(RO.dtype.element_ty), mask=m)
                if IS_RMS:
                    acc += s * s
                else:
                    acc += s
            if IS_RMS:
                m1 = 0.0
                c = 0.0
                var = tl.sum(acc, axis=0) / N
            else:
                m1 = tl.sum(acc, axis=0) / N
                # Pass 2: the corrected two-pass moments about m1 (as in the single-chunk branch).
                acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
                for start in range(0, N, BLOCK_N):
                    col = start + cols
                    m = col < N
                    d = tl.where(m, _load_s(x_row, r_row, col, m, HAS_RESIDUAL, SOFT_BF16) - m1, 0.0)
                    acc += d
                    acc2 += d * d
                c = tl.sum(acc, axis=0) / N
                var = tl.sum(acc2, axis=0) / N - c * c
                var = tl.where(var < 0.0, 0.0, var)
            rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
            # Last pass: normalize and store. s is recomputed from x (+ r) rather than re-read from RO.
            ncr = -c * rstd
            for start in range(0, N, BLOCK_N):
                col = start + cols
                m = col < N
                s = _load_s(x_row, r_row, col, m, HAS_RESIDUAL, SOFT_BF16)
                w, b = _load_params(W, B, col, m, HAS_WEIGHT, HAS_BIAS)
                _normalize_store(Y + row64 * stride_y_row, w, b, s, m1, ncr, rstd, col, m, IS_RMS, HAS_WEIGHT,
                                 HAS_BIAS, SOFT_BF16)
            if not IS_RMS:
                tl.store(Mean + row64, m1 + c)
            tl.store(Rstd + row64, rstd)


@triton.jit
def _bwd_row_terms(DY, S, W, cols, mask, mean, rstd, IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Loads one block of a row; returns (dy, xhat, wdy) in fp32, all 0 past N."""
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xhat = s * rstd
    else:
        xhat = tl.where(mask, (s - mean) * rstd, 0.0)
    if HAS_WEIGHT:
        # Rounded: an FMA with a zero addend, which the compiler cannot fuse further. A plain product gets fused
        # into dx's wdy - (xhat c1 + c2) (one FMA with the exact product), while c2 sums rounded ones: rstd times
        # their difference where dx is 0 (N = 1: dx = rstd (wdy - wdy)).
        wdy = tl.fma(dy, tl.load(W + cols, mask=mask, other=0.0).to(tl.float32), 0.0)
    else:
        wdy = dy
    return dy, xhat, wdy


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) gradient of y, row stride stride_dy_row
    S,  # (M, N) saved normalized input (x or x + residual), row stride stride_s_row
    W,  # (N,) weight (dummy unless HAS_WEIGHT)
    Mean,  # (M,) fp32 (dummy when IS_RMS)
    Rstd,  # (M,) fp32
    DRES,  # (M, N) gradient of residual_out, row stride stride_dres_row (dummy unless HAS_DRES)
    DX,  # (M, N) output gradient of x (and of residual), row stride stride_dx_row
    DW_partial,  # (P, N) fp32 per-program column sums of dy * xhat (dummy unless COMPUTE_DW)
    DB_partial,  # (P, N) fp32 per-program column sums of dy (dummy unless COMPUTE_DB)
    stride_dy_row,
    stride_s_row,
    stride_dres_row,
    stride_dx_row,
    M,  # rows
    N,  # hidden size
    rows_per_program,
    BLOCK_N: tl.constexpr,  # power of 2; >= N when SINGLE_CHUNK, else the chunk width
    SINGLE_CHUNK: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DRES: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # exact bf16 rounding in the CPU interpreter (see _round_to)
):
    # Program p handles rows [p * rows_per_program, min((p + 1) * rows_per_program, M)) in order.
    # The row counter is i32 (the launcher keeps M + rows_per_program < 2^31); addresses use int64.
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    DW_partial += pid.to(tl.int64) * N
    DB_partial += pid.to(tl.int64) * N
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_CHUNK:
        mask = cols < N
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in tl.range(row_start, row_end, num_stages=3):  # rows two ahead in flight (module docstring)
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            row64 = tl.cast(row, tl.int64)
            dy, xhat, wdy = _bwd_row_terms(
                DY + row64 * stride_dy_row,
                S + row64 * stride_s_row,
                W,
                cols,
                mask,
                mean,
                rstd,
                IS_RMS,
                HAS_WEIGHT,
            )
            c1 = tl.sum(xhat * wdy, axis=0) / N
            if IS_RMS:
                dx = (wdy - xhat * c1) * rstd
            else:
                c2 = tl.sum(wdy, axis=0) / N
                dx = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DRES:
                dx += tl.load(DRES + row64 * stride_dres_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(
                DX + row64 * stride_dx_row + cols, _round_to(dx, DX.dtype.element_ty, SOFT_BF16), mask=mask
            )
            if COMPUTE_DW:
                dw_acc += dy * xhat
            if COMPUTE_DB:
                db_acc += dy
        if COMPUTE_DW:
            tl.store(DW_partial + cols, dw_acc, mask=mask)
        if COMPUTE_DB:
            tl.store(DB_partial + cols, db_acc, mask=mask)
    else:
        # Wide rows: the per-program column sums live in this program's own row of the partial
        # buffers (read-modify-write by the same thread, same layout: no other program touches it).
        if COMPUTE_DW or COMPUTE_DB:
            zero = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                if COMPUTE_DW:
                    tl.store(DW_partial + c, zero, mask=c < N)
                if COMPUTE_DB:
                    tl.store(DB_partial + c, zero, mask=c < N)
        for row in range(row_start, row_end):
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            row64 = tl.cast(row, tl.int64)
            dy_row = DY + row64 * stride_dy_row
            s_row = S + row64 * stride_s_row
            dres_row = DRES + row64 * stride_dres_row
            dx_row = DX + row64 * stride_dx_row
            # Pass 1: the two row means needed by dx.
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                dy, xhat, wdy = _bwd_row_terms(dy_row, s_row, W, c, c < N, mean, rstd, IS_RMS, HAS_WEIGHT)
                acc1 += xhat * wdy
                if not IS_RMS:
                    acc2 += wdy
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            # Pass 2: dx, and the dweight/dbias column sums.
            for start in range(0, N, BLOCK_N):
                c = start + cols
                m = c < N
                dy, xhat, wdy = _bwd_row_terms(dy_row, s_row, W, c, m, mean, rstd, IS_RMS, HAS_WEIGHT)
                if IS_RMS:
                    dx = (wdy - xhat * c1) * rstd
                else:
                    dx = (wdy - (xhat * c1 + c2)) * rstd
                if HAS_DRES:
                    dx += tl.load(dres_row + c, mask=m, other=0.0).to(tl.float32)
                tl.store(dx_row + c, _round_to(dx, DX.dtype.element_ty, SOFT_BF16), mask=m)
                if COMPUTE_DW:
                    tl.store(DW_partial + c, tl.load(DW_partial + c, mask=m, other=0.0) + dy * xhat, mask=m)
                if COMPUTE_DB:
                    tl.store(DB_partial + c, tl.load(DB_partial + c, mask=m, other=0.0) + dy, mask=m)


@triton.jit
def _layer_norm_bwd_dwdb_kernel(
    DW_partial,  # (P, N) fp32 partial sums (dummy unless COMPUTE_DW)
    DB_partial,  # (P, N) fp32 partial sums (dummy unless COMPUTE_DB)
    DW,  # (N,) dweight, weight dtype
    DB,  # (N,) dbias, weight dtype
    P,  # number of partial rows
    N,  # hidden size
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # exact bf16 rounding in the CPU interpreter (see _round_to)
):
    # Program j sums columns [j * BLOCK_N, (j + 1) * BLOCK_N) over the P partial rows, in a fixed order.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw_acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = (rows < P)[:, None] & col_mask[None, :]
        if COMPUTE_DW:
            dw_acc += tl.load(DW_partial + offs, mask=mask, other=0.0)
        if COMPUTE_DB:
            db_acc += tl.load(DB_partial + offs, mask=mask, other=0.0)
    if COMPUTE_DW:
        tl.store(DW + cols, _round_to(tl.sum(dw_acc, axis=0), DW.dtype.element_ty, SOFT_BF16), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB + cols, _round_to(tl.sum(db_acc, axis=0), DB.dtype.element_ty, SOFT_BF16), mask=col_mask)


# --------------------------------------------------------------------------------------------------
# Launch heuristics (shared by the launchers and compile_configs, so the compile check sees exactly
# the configurations the launchers can pick)
# --------------------------------------------------------------------------------------------------


def _block_n(N: int, max_block: int):
    """(BLOCK_N, SINGLE_CHUNK) for hidden size N: the whole row in one block up to max_block columns,
    else chunks of _CHUNK_N columns."""
    block = triton.next_power_of_2(N)
    if block <= max_block:
        return block, True
    return _CHUNK_N, False


# Resident warps per SM each kernel is sized for. The register cap (maxnreg) follows from it: with an
# explicit cap ptxas uses registers up to it instead of squeezing towards a higher occupancy on its own,
# which otherwise produces small spills in a few configurations (seen with Triton 3.9's ptxas).
_FWD_WARPS_PER_SM = 32  # forward: persistent programs at >= 50% occupancy (H100), rows in a pipelined loop
_BWD_WARPS_PER_SM = 16  # backward: the grid itself holds ~16 warps per SM (see _bwd_num_programs)
_REGS_PER_SM = 65536


def _maxnreg(warps_per_sm: int) -> int:
    return min(255, _REGS_PER_SM // (32 * warps_per_sm)) // 8 * 8


def _fwd_num_warps(block_n: int) -> int:
    # About 8-16 fp32 elements of the row per thread; 16 warps from 4096 columns up.
    return min(max(block_n // 256, 1), 16)


def _bwd_num_warps(block_n: int) -> int:
    # The backward keeps dy, s, w and two column accumulators live: spread the row wider.
    return min(max(block_n // 128, 1), 16)


def _fwd_launch_options(block_n: int) -> dict:
    return {"num_warps": _fwd_num_warps(block_n), "maxnreg": _maxnreg(_FWD_WARPS_PER_SM)}


def _bwd_launch_options(block_n: int) -> dict:
    return {"num_warps": _bwd_num_warps(block_n), "maxnreg": _maxnreg(_BWD_WARPS_PER_SM)}


def _red_launch_options() -> dict:
    return {"num_warps": _RED_NUM_WARPS, "maxnreg": _maxnreg(_BWD_WARPS_PER_SM)}


def _resident_programs(M: int, num_warps: int, warps_per_sm: int, device: torch.device) -> int:
    """A grid of the programs of num_warps warps the SMs hold at once at warps_per_sm (each program then walks
    several rows), at most M."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = sms * max(1, warps_per_sm // num_warps)
    else:
        programs = 4  # the interpreter runs programs one by one: few programs, many rows each
    return max(1, min(M, programs))


def _fwd_num_programs(M: int, num_warps: int, device: torch.device) -> int:
    if M >= 2**31:  # (the kernel's row counter is i32)
        raise ValueError(f"pyattn Triton layer_norm: at most 2^31 - 1 rows, got {M}")
    return _resident_programs(M, num_warps, _FWD_WARPS_PER_SM, device)


def _bwd_num_programs(M: int, num_warps: int, device: torch.device) -> int:
    return _resident_programs(M, num_warps, _BWD_WARPS_PER_SM, device)


class _NoDeviceGuard:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensor's device.
    return torch.cuda.device(t.device) if t.is_cuda else _NoDeviceGuard()


def _check_hidden_size(N: int):
    if N > MAX_HIDDEN_SIZE:
        raise ValueError(
            f"pyattn Triton layer_norm: hidden size {N} exceeds the supported maximum of {MAX_HIDDEN_SIZE}"
        )


def _rows_2d(t: torch.Tensor, name: str, shape) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"pyattn Triton layer_norm: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}"
        )
    if t.stride(-1) != 1:  # kernels need unit column stride; anything else is copied
        t = t.contiguous()
    return t


def _vector(t, name: str, N: int):
    if t is None:
        return None
    if t.dim() != 1 or t.shape[0] != N:
        raise ValueError(f"pyattn Triton layer_norm: {name} has shape {tuple(t.shape)}, expected ({N},)")
    return t.contiguous()


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def layer_norm_fwd(x, residual, weight, bias, eps: float, rms: bool, store_residual: bool):
    """LayerNorm / RMSNorm forward of s = x (+ residual) over the last dim of a 2-D x.

    x: (M, N), last stride 1 (else copied), any row stride. residual: None or (M, N), x.dtype.
    weight/bias: None or (N,), fp32 or x.dtype. rms=True: RMSNorm (bias must be None).
    Returns (y, residual_out, mean, rstd):
      y (M, N) contiguous x.dtype; residual_out (M, N) x.dtype = x + residual rounded to x.dtype when
      store_residual and residual is given, else torch.empty(0); mean (M,) fp32 (empty when rms);
      rstd (M,) fp32.
    """
    if x.dim() != 2:
        raise ValueError(f"pyattn Triton layer_norm: expected a 2-D input, got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"pyattn Triton layer_norm: unsupported dtype {x.dtype}")
    if rms and bias is not None:
        raise ValueError("pyattn Triton layer_norm: RMSNorm takes no bias")
    M, N = x.shape
    _check_hidden_size(N)
    x = _rows_2d(x, "x", (M, N))
    if residual is not None:
        residual = _rows_2d(residual, "residual", (M, N))
        if residual.dtype != x.dtype:
            raise ValueError(
                f"pyattn Triton layer_norm: residual dtype {residual.dtype} != input dtype {x.dtype}"
            )
    weight = _vector(weight, "weight", N)
    bias = _vector(bias, "bias", N)
    store_residual = bool(store_residual) and residual is not None

    dev = x.device
    y = torch.empty((M, N), dtype=x.dtype, device=dev)
    residual_out = (
        torch.empty((M, N), dtype=x.dtype, device=dev)
        if store_residual
        else torch.empty(0, dtype=x.dtype, device=dev)
    )
    mean = torch.empty(0 if rms else M, dtype=torch.float32, device=dev)
    rstd = torch.empty(M, dtype=torch.float32, device=dev)
    if M == 0 or N == 0:  # nothing to normalize, no launch; N == 0 gives torch's mean 0, rstd NaN
        mean.zero_()
        rstd.fill_(float("nan"))
        return y, residual_out, mean, rstd

    block_n, single = _block_n(N, _MAX_FUSED_BLOCK_N_FWD)
    options = _fwd_launch_options(block_n)
    programs = _fwd_num_programs(M, options["num_warps"], dev)
    with _device_guard(x):
        _layer_norm_fwd_kernel[(programs,)](
            x,
            residual if residual is not None else x,
            y,
            residual_out if store_residual else y,
            weight if weight is not None else x,
            bias if bias is not None else x,
            mean if not rms else rstd,
            rstd,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            y.stride(0),
            residual_out.stride(0) if store_residual else 0,
            M,
            N,
            float(eps),
            BLOCK_N=block_n,
            SINGLE_CHUNK=single,
            IS_RMS=bool(rms),
            HAS_RESIDUAL=residual is not None,
            STORE_RESIDUAL=store_residual,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            SOFT_BF16=not x.is_cuda,
            **options,
        )
    return y, residual_out, mean, rstd


def layer_norm_bwd(dy, s, weight, mean, rstd, dresidual_out, rms: bool, has_bias: bool, need_dweight: bool):
    """Backward of layer_norm_fwd.

    dy: (M, N) any row stride, last stride 1 (else copied). s: (M, N) saved normalized input (x or
    x + residual), dy.dtype. weight: None or (N,). mean/rstd: from the forward (mean ignored when rms).
    dresidual_out: None or (M, N), gradient of residual_out; added to dx.
    Returns (dx, dweight, dbias): dx (M, N) contiguous s.dtype (also the residual's gradient);
    dweight (N,) weight.dtype when weight is given and need_dweight, else empty; dbias (N,)
    weight.dtype (s.dtype without weight) when has_bias and need_dweight, else empty.
    dweight/dbias are reduced deterministically (bitwise reproducible on a given device).
    """
    if s.dim() != 2:
        raise ValueError(f"pyattn Triton layer_norm: expected a 2-D input, got shape {tuple(s.shape)}")
    if s.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"pyattn Triton layer_norm: unsupported dtype {s.dtype}")
    M, N = s.shape
    _check_hidden_size(N)
    s = _rows_2d(s, "s", (M, N))
    dy = _rows_2d(dy, "dy", (M, N))
    if dresidual_out is not None:
        dresidual_out = _rows_2d(dresidual_out, "dresidual_out", (M, N))
    weight = _vector(weight, "weight", N)
    mean = mean.contiguous() if not rms else None
    rstd = rstd.contiguous()

    dev = s.device
    param_dtype = weight.dtype if weight is not None else s.dtype
    compute_dw = bool(need_dweight) and weight is not None
    compute_db = bool(need_dweight) and bool(has_bias)
    dx = torch.empty((M, N), dtype=s.dtype, device=dev)
    empty = torch.empty(0, dtype=param_dtype, device=dev)
    if M == 0 or N == 0:  # no rows (or columns): zero parameter gradients, no launch
        dw = torch.zeros(N, dtype=param_dtype, device=dev) if compute_dw else empty
        db = torch.zeros(N, dtype=param_dtype, device=dev) if compute_db else empty
        return dx, dw, db

    block_n, single = _block_n(N, _MAX_FUSED_BLOCK_N_BWD)
    options = _bwd_launch_options(block_n)
    programs = _bwd_num_programs(M, options["num_warps"], dev)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)  # no program without rows
    if M + rows_per_program >= 2**31:  # the kernel's row counter is i32
        raise ValueError(f"pyattn Triton layer_norm: {M} rows exceed the supported maximum of 2^31 - 1")
    dw_partial = torch.empty((programs, N) if compute_dw else (0,), dtype=torch.float32, device=dev)
    db_partial = torch.empty((programs, N) if compute_db else (0,), dtype=torch.float32, device=dev)
    dw = torch.empty(N, dtype=param_dtype, device=dev) if compute_dw else empty
    db = torch.empty(N, dtype=param_dtype, device=dev) if compute_db else empty

    with _device_guard(s):
        _layer_norm_bwd_kernel[(programs,)](
            dy,
            s,
            weight if weight is not None else s,
            mean if mean is not None else rstd,
            rstd,
            dresidual_out if dresidual_out is not None else dy,
            dx,
            dw_partial if compute_dw else rstd,
            db_partial if compute_db else rstd,
            dy.stride(0),
            s.stride(0),
            dresidual_out.stride(0) if dresidual_out is not None else 0,
            dx.stride(0),
            M,
            N,
            rows_per_program,
            BLOCK_N=block_n,
            SINGLE_CHUNK=single,
            IS_RMS=bool(rms),
            HAS_WEIGHT=weight is not None,
            HAS_DRES=dresidual_out is not None,
            COMPUTE_DW=compute_dw,
            COMPUTE_DB=compute_db,
            SOFT_BF16=not s.is_cuda,
            **options,
        )
        if compute_dw or compute_db:
            _layer_norm_bwd_dwdb_kernel[(triton.cdiv(N, _RED_BLOCK_N),)](
                dw_partial if compute_dw else db_partial,
                db_partial if compute_db else dw_partial,
                dw if compute_dw else db,
                db if compute_db else dw,
                programs,
                N,
                BLOCK_P=_RED_BLOCK_P,
                BLOCK_N=_RED_BLOCK_N,
                COMPUTE_DW=compute_dw,
                COMPUTE_DB=compute_db,
                SOFT_BF16=not s.is_cuda,
                **_red_launch_options(),
            )
    return dx, dw, db


# --------------------------------------------------------------------------------------------------
# Offline compile check (scripts/compile_triton.py)
# --------------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def shipped_block_configs(max_block: int, full: bool = True):
    """Every (BLOCK_N, SINGLE_CHUNK) a launcher with this max_block can pick: each power of 2 up to
    max_block in one block, plus the chunked configuration used for max_block < N <= MAX_HIDDEN_SIZE.
    full=False keeps a representative subset: one BLOCK_N per num_warps value, the largest single block
    and the chunked one."""
    out = [(1 << k, True) for k in range(int(math.log2(max_block)) + 1)]
    if not full:
        out = [(b, single) for b, single in out if b in (16, 256, 1024, 2048, 4096, max_block)]
    out.append(_block_n(MAX_HIDDEN_SIZE, max_block))
    return out


def _flag_combos(kernel: str, full: bool):
    """Constexpr flag combinations to compile. Representative: the heaviest LayerNorm and RMSNorm
    combinations (register pressure) and the lightest; full: every valid combination."""
    if kernel == "fwd":  # (IS_RMS, HAS_RESIDUAL, STORE_RESIDUAL, HAS_WEIGHT, HAS_BIAS)
        everything = [
            (rms, res, store, w, b)
            for rms in (False, True)
            for res in (False, True)
            for store in ((False, True) if res else (False,))
            for w in (False, True)
            for b in ((False,) if rms else (False, True))
        ]
        names = ("IS_RMS", "HAS_RESIDUAL", "STORE_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS")
        # heaviest LayerNorm / RMSNorm (with and without residual_out), lightest
        pick = [
            (False, True, True, True, True),
            (False, True, False, True, True),
            (True, True, True, True, False),
            (True, True, False, True, False),
            (False,) * 5,
        ]
    else:  # (IS_RMS, HAS_WEIGHT, HAS_DRES, COMPUTE_DW, COMPUTE_DB)
        everything = [
            (rms, w, dres, cdw, cdb)
            for rms in (False, True)
            for w in (False, True)
            for dres in (False, True)
            for cdw in ((False, True) if w else (False,))
            for cdb in ((False,) if rms else (False, True))
        ]
        names = ("IS_RMS", "HAS_WEIGHT", "HAS_DRES", "COMPUTE_DW", "COMPUTE_DB")
        pick = [(False, True, True, True, True), (True, True, True, True, False), (False,) * 5]
    return [dict(zip(names, combo)) for combo in (everything if full else pick)]


def compile_configs(full: bool = False):
    """Configurations for scripts/compile_triton.py: a list of
    (kernel_fn, signature, constexprs, num_warps, {"maxnreg": ...}) with the launch options the launchers
    pick for each BLOCK_N.

    Representative (default): x dtypes fp32/fp16/bf16 (weights fp32, fp16, fp32 respectively) x BLOCK_N in
    {16, 256, 1024, 2048, 4096, (8192,) chunked} (every num_warps value, the largest single block and the
    chunked path used up to N = 65536) x the heaviest/lightest flag combinations; plus the reduction kernel.
    full=True: every shipped BLOCK_N, both weight dtypes, every valid flag combination.
    """
    # Strides as the JIT usually sees them (Python ints below 2^31 arrive as i32; the kernels widen
    # row offsets to int64 themselves).
    idx = "i32"
    configs = []
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        t = _TRITON_DTYPE[dt]
        if full:
            wts = [t] if dt == torch.float32 else [t, "fp32"]
        else:
            wts = ["fp16"] if dt == torch.float16 else ["fp32"]
        for wt in wts:
            for block_n, single in shipped_block_configs(_MAX_FUSED_BLOCK_N_FWD, full):
                for flags in _flag_combos("fwd", full):
                    sig = {
                        "X": f"*{t}",
                        "R": f"*{t}",
                        "Y": f"*{t}",
                        "RO": f"*{t}",
                        "W": f"*{wt}",
                        "B": f"*{wt}",
                        "Mean": "*fp32",
                        "Rstd": "*fp32",
                        "stride_x_row": idx,
                        "stride_r_row": idx,
                        "stride_y_row": idx,
                        "stride_ro_row": idx,
                        "M": "i32",
                        "N": "i32",
                        "eps": "fp32",
                    }
                    consts = {"BLOCK_N": block_n, "SINGLE_CHUNK": single, **flags, "SOFT_BF16": False}
                    sig.update({k: "constexpr" for k in consts})
                    opts = _fwd_launch_options(block_n)
                    configs.append((_layer_norm_fwd_kernel, sig, consts, opts.pop("num_warps"), opts))
            for block_n, single in shipped_block_configs(_MAX_FUSED_BLOCK_N_BWD, full):
                for flags in _flag_combos("bwd", full):
                    sig = {
                        "DY": f"*{t}",
                        "S": f"*{t}",
                        "W": f"*{wt}",
                        "Mean": "*fp32",
                        "Rstd": "*fp32",
                        "DRES": f"*{t}",
                        "DX": f"*{t}",
                        "DW_partial": "*fp32",
                        "DB_partial": "*fp32",
                        "stride_dy_row": idx,
                        "stride_s_row": idx,
                        "stride_dres_row": idx,
                        "stride_dx_row": idx,
                        "M": "i32",
                        "N": "i32",
                        "rows_per_program": "i32",
                    }
                    consts = {"BLOCK_N": block_n, "SINGLE_CHUNK": single, **flags, "SOFT_BF16": False}
                    sig.update({k: "constexpr" for k in consts})
                    opts = _bwd_launch_options(block_n)
                    configs.append((_layer_norm_bwd_kernel, sig, consts, opts.pop("num_warps"), opts))
            # The reduction kernel does not depend on the row kernels' BLOCK_N; its output has the
            # parameter dtype.
            for cdw, cdb in ((True, True), (True, False), (False, True)) if full else ((True, True),):
                sig = {
                    "DW_partial": "*fp32",
                    "DB_partial": "*fp32",
                    "DW": f"*{wt}",
                    "DB": f"*{wt}",
                    "P": "i32",
                    "N": "i32",
                }
                consts = {
                    "BLOCK_P": _RED_BLOCK_P,
                    "BLOCK_N": _RED_BLOCK_N,
                    "COMPUTE_DW": cdw,
                    "COMPUTE_DB": cdb,
                    "SOFT_BF16": False,
                }
                sig.update({k: "constexpr" for k in consts})
                opts = _red_launch_options()
                configs.append((_layer_norm_bwd_dwdb_kernel, sig, consts, opts.pop("num_warps"), opts))
    return configs
