"""The CUDA kernels (csrc/cuda/*.cu) and their bindings (csrc/bindings/cuda/*.cpp), run without a GPU by the CUDA
emulator (csrc/emu/cuda_emu.h, built by scripts/cuda_emu.py as torch.ops.pyattn_emu on CPU tensors).

What this proves: the kernels' indexing, tiling, masking, online softmax, fragment layouts (as the PTX ISA defines
ldmatrix and mma.sync m16n8k16), cp.async / __syncthreads ordering, warp shuffles, reductions and the bindings'
host logic give the float64 oracle's results on small shapes, in five thread / cp.async schedules, and (built with
AddressSanitizer) touch no byte outside their buffers. What it cannot prove: timing-dependent behaviour of real
hardware and anything about speed; tests/test_gpu.py does that on a GPU.
"""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from pyattn.backends import cpp
from pyattn.backends.torch import causal_keep
from pyattn.testing import (assert_attention_close, assert_tol, attention_dropout_ref, attention_low, attention_ref,
                            make_qkv, nan_padded_rows, norm_ref, put_huge_mask_rows)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import cuda_emu  # noqa: E402

# (thread order, cp.async completion): see csrc/emu/cuda_emu.h. Late copies expose reads before a wait; early copies
# with a warp running ahead expose buffers refilled while other warps still read them.
SCHEDULES = (("forward", "late"), ("reverse", "late"), ("forward", "early"), ("reverse", "early"), ("random", "late"))


@pytest.fixture(scope="module", autouse=True)
def emu():
    """Builds (incrementally) and loads the emulator library; every test here runs the CUDA code through it."""
    cuda_emu.build()
    return torch.ops.pyattn_emu


@pytest.fixture(params=SCHEDULES, ids="-".join)
def order(request, monkeypatch):
    """How the emulator schedules a block's threads and completes cp.async (a missing barrier or a race on shared
    memory changes the result in at least one schedule)."""
    monkeypatch.setenv("PYATTN_EMU_ORDER", request.param[0])
    monkeypatch.setenv("PYATTN_EMU_CP_ASYNC", request.param[1])
    return request.param


# ---- the emulator's own checks ----------------------------------------------------------------------------------
# Kernels with one deliberate defect each (csrc/emu/selftest.cpp): every check must fire, so that the clean runs of
# the real kernels below mean something.

@pytest.mark.parametrize("case,message", [
    ("divergent_barrier", "divergent __syncthreads"),
    ("shuffle_after_exit", "after lanes of the warp exited"),
    ("partial_mask", "partial mask"),
    ("shuffle_vs_barrier", "deadlock"),
    ("launch_bounds", r"exceeds the kernel's __launch_bounds__\(64\)"),
    ("ldmatrix_misaligned", "not 16-byte aligned"),
    ("ldmatrix_outside_smem", "outside the block's shared memory"),
    ("too_much_smem", "bytes of dynamic shared memory"),
    ("bad_block", "invalid launch configuration"),
    ("wgmma_exit_in_flight", "wgmma of its warp not waited for"),
    ("tma_deadlock", "waits on an mbarrier phase that never completes"),
    ("named_barrier_deadlock", "waits at named barrier 1 for arrivals that never come"),
    ("grid_sync_not_cooperative", r"grid_sync outside a cooperative launch"),
    ("grid_sync_deadlock", r"deadlock: thread \(0, 0, 0\) of block \(0, 0, 0\) waits at grid_sync "
                           r"\(.*selftest.cpp:\d+\) while thread \(0, 0, 0\) of block \(1, 0, 0\) has exited"),
    ("grid_sync_divergent", r"divergent grid_sync: .* of block \(0, 0, 0\) at .*, .* of block \(1, 0, 0\) at "),
])
def test_emulator_reports_each_defect(case, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pyattn_emu.emu_selftest(case)


def test_emulator_schedules_expose_a_missing_barrier_and_an_early_read(monkeypatch):
    """A shared value read without a barrier after another warp writes it, and a cp.async destination read before
    its wait: the schedules give different answers, so the kernels' results being schedule-independent is a real
    check."""
    ops = torch.ops.pyattn_emu
    seen = set()
    for order in ("forward", "reverse"):
        monkeypatch.setenv("PYATTN_EMU_ORDER", order)
        seen.add(ops.emu_selftest("missing_barrier"))
    assert seen == {0, 42}
    monkeypatch.setenv("PYATTN_EMU_CP_ASYNC", "late")
    assert ops.emu_selftest("read_before_wait") == -1  # the 0xff-filled shared memory: the copy has not landed
    monkeypatch.setenv("PYATTN_EMU_CP_ASYNC", "early")
    assert ops.emu_selftest("read_before_wait") == 7
    # wgmma: the product lands at the wait_group that covers it, not at issue
    assert ops.emu_selftest("wgmma_ones") == 16
    assert ops.emu_selftest("wgmma_read_before_wait") == -1
    # bulk tensor copies: land at the mbarrier wait (late) or at issue (early)
    monkeypatch.setenv("PYATTN_EMU_CP_ASYNC", "late")
    assert ops.emu_selftest("tma_box") == 0x4700
    assert ops.emu_selftest("tma_read_before_wait") == 0xffff
    monkeypatch.setenv("PYATTN_EMU_CP_ASYNC", "early")
    assert ops.emu_selftest("tma_read_before_wait") == 0x4700
    # a named barrier orders warp 1's write before warp 0's read whichever runs first
    for order in ("forward", "reverse"):
        monkeypatch.setenv("PYATTN_EMU_ORDER", order)
        assert ops.emu_selftest("named_barrier") == 42


def test_emulator_cooperative_launch_grid_sync(monkeypatch):
    """A cooperative launch (3 blocks of 64 threads, alive at once) exchanging values between blocks across
    grid_sync: the right sum in every order (the barrier orders each round's writes before other blocks' reads, and
    their reads before the next round's writes; each block keeps its own shared memory); without the barriers a
    different sum in every order; a grid larger than can be co-resident is refused (cudaErrorCooperativeLaunchTooLarge,
    720) by the occupancy model over the emulated SMs."""
    ops = torch.ops.pyattn_emu
    expected = sum((t + 1) * (o * 64 + (i + t) % 64 + 1)
                   for b in range(3) for i in range(64) for t in range(4) for o in range(3) if o != b)
    for order, seed in (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2), ("random", 3)):
        monkeypatch.setenv("PYATTN_EMU_ORDER", order)
        monkeypatch.setenv("PYATTN_EMU_SEED", str(seed))
        for cp_async in ("late", "early"):
            monkeypatch.setenv("PYATTN_EMU_CP_ASYNC", cp_async)
            assert ops.emu_selftest("grid_exchange") == expected, (order, seed)
        assert ops.emu_selftest("grid_exchange_no_barrier") != expected, (order, seed)
    # occupancy: blocks per SM for (256 threads, no smem) = 8, (512, 220 KiB) = 1, (32, 1 KiB) = 32
    assert ops.emu_selftest("coop_occupancy") == 80132
    assert ops.emu_selftest("coop_sm_count") == 132
    with pytest.raises(RuntimeError, match=r"error 720: cooperative launch of 4225 blocks: at most 4224 can be"):
        ops.emu_selftest("coop_too_large")
    monkeypatch.setenv("PYATTN_EMU_SMS", "4")
    assert ops.emu_selftest("coop_sm_count") == 4
    with pytest.raises(RuntimeError, match=r"error 720: cooperative launch of 129 blocks: at most 128 can be"):
        ops.emu_selftest("coop_too_large")


def test_emulator_build_needs_the_shared_libstdcxx():
    """The emulator library runs on torch's C++ runtime, as pyattn._C does (tests/test_extension_runtime.py): built
    with a g++ that linked a private static libstdc++, its refusal messages segfaulted on the H200 machine."""
    import shutil
    import subprocess

    if not sys.platform.startswith("linux") or shutil.which("readelf") is None:
        pytest.skip("needs Linux and readelf (binutils) to read the library's dynamic section")
    out = subprocess.run(["readelf", "-d", cuda_emu.build()], capture_output=True, text=True, check=True).stdout
    assert any("libstdc++.so" in line for line in out.splitlines() if "(NEEDED)" in line)


# ---- attention -------------------------------------------------------------------------------------------------

def _fwd(q, k, v, mask=None, p=0.0, causal=False, bottom_right=False, scale=None, seed=0, offset=0):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.pyattn_emu.attn_fwd(q, k, v, mask, p, causal, bottom_right, scale, seed, offset)


def _bwd(dout, q, k, v, out, lse, mask=None, p=0.0, causal=False, bottom_right=False, scale=None, seed=0, offset=0):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.pyattn_emu.attn_bwd(dout, q, k, v, out, lse, mask, p, causal, bottom_right, scale, seed, offset)


def _check_attention(q, k, v, mask=None, causal=False, bottom_right=False, seed=0):
    """Forward and backward against the float64 oracle with TESTING.md's 2x / 3x rule; returns (out, lse, grads)."""
    out, lse = _fwd(q, k, v, mask, causal=causal, bottom_right=bottom_right)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(q.dtype)
    grads = _bwd(dout, q, k, v, out, lse, mask, causal=causal, bottom_right=bottom_right)
    ref, ref_lse, ref_grads = attention_ref(q, k, v, mask, causal=causal, bottom_right=bottom_right, dout=dout)
    low, low_grads = attention_low(q, k, v, mask, causal=causal, bottom_right=bottom_right, dout=dout)
    assert_attention_close(out, ref, low, 2)
    for name, g, r, lo in zip("qkv", grads, ref_grads, low_grads):
        assert_attention_close(g, r, lo, 3, name=f"d{name}")
    live, dead = ref_lse.isfinite(), ~ref_lse.isfinite()
    # rows whose logits all sit near finfo.min: the log2-domain mask saturates at -FLT_MAX, so lse is -FLT_MAX * ln 2
    # there, as in the CPU kernels (csrc/cpu/attention.cpp); the output is still the uniform softmax
    sat = live & (ref_lse.abs() > 1e30)
    live &= ~sat
    torch.testing.assert_close(lse[live].double(), ref_lse[live].double(), atol=1e-3, rtol=1e-4)
    assert bool((lse[sat] < -1e38).all())
    assert bool((lse[dead] == math.inf).all())
    return out, lse, grads


# (lq, lk, d, dv, causal, bottom_right, hq, hkv): head dims of every kernel configuration (<= 64, <= 128, <= 256,
# odd ones on the 2-byte path), D != Dv, GQA, both causal alignments with Lq < Lk and Lq > Lk, one query row, blocks
# with nothing to do.
ATTN_CASES = [
    (64, 64, 64, 64, False, False, 4, 4),
    (33, 70, 128, 128, True, True, 4, 2),
    (70, 33, 128, 128, True, False, 2, 1),
    (70, 33, 64, 64, True, True, 2, 2),
    (1, 97, 96, 96, False, False, 4, 4),
    (47, 47, 59, 59, True, False, 2, 2),
    (40, 40, 256, 256, True, False, 2, 1),
    (50, 30, 24, 40, False, False, 4, 2),
    (17, 100, 200, 256, False, False, 2, 2),
    (300, 17, 64, 64, True, True, 2, 1),   # whole query blocks that see no key (bottom-right, Lq > Lk)
    (17, 300, 64, 64, True, False, 2, 1),  # whole key blocks that no query sees (top-left, Lk > Lq)
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ATTN_CASES, ids=str)
def test_attention_vs_oracle(dtype, case):
    lq, lk, d, dv, causal, bottom_right, hq, hkv = case
    q, k, v = make_qkv(2, hq, lq, lk, d, dv=dv, hkv=hkv, dtype=dtype, seed=lq + lk + d)
    _check_attention(q, k, v, causal=causal, bottom_right=bottom_right, seed=d)


def test_attention_thread_orders_give_the_same_bits(order, monkeypatch):
    """Every schedule gives the oracle's result and the bits of the default (forward) schedule: the kernels' shared
    memory traffic is ordered by barriers and cp.async waits, not by the order threads happen to run in."""
    q, k, v = make_qkv(1, 4, 70, 90, 64, hkv=2, dtype=torch.bfloat16, seed=5)
    out, lse, grads = _check_attention(q, k, v, causal=True, seed=5)
    monkeypatch.setenv("PYATTN_EMU_ORDER", "forward")
    monkeypatch.setenv("PYATTN_EMU_CP_ASYNC", "late")
    base = _fwd(q, k, v, causal=True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(q.dtype)
    base_grads = _bwd(dout, q, k, v, *base, causal=True)
    for a, b in zip((out, lse, *grads), (*base, *base_grads)):
        assert torch.equal(a, b), order


@pytest.mark.parametrize("d,dv", [(64, 64), (24, 40), (128, 96)])
def test_attention_layouts_bit_identical(d, dv, monkeypatch):
    """Same values in every layout give the same bits: 16-byte rows (cp.async) and unaligned rows (NaN-padded
    buffers, strided last dims copied by the binding) alike, and nothing past a row's end is read. (The mma.sync
    kernels: the Hopper forward and backward take 16-byte-aligned rows only; test_attention_sm90_forward and
    test_attention_sm90_backward cover them.)"""
    monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90", "0")
    monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90_BWD", "0")

    def run(layout):
        q, k, v = make_qkv(2, 4, 40, 50, d, dv=dv, hkv=2, dtype=torch.bfloat16, layout=layout, seed=15)
        out, lse = _fwd(q, k, v, causal=True)
        dout = torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype)
        return (out, lse, *_bwd(dout, q, k, v, out, lse, causal=True))

    base = run("contiguous")
    assert all(bool(t.isfinite().all()) for t in base)
    for layout in ("blhd", "packed", "nan_padded", "strided", "contiguous"):
        for a, b in zip(run(layout), base):
            assert torch.equal(a, b), layout


@pytest.mark.parametrize("shape", [(1, 1, 1, 37), (1, 1, 19, 37), (2, 1, 1, 37), (1, 2, 19, 37), (2, 2, 19, 37),
                                   (2, 1, 19, 1)], ids=str)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attention_masks_broadcast(shape, kind):
    g = torch.Generator().manual_seed(len(str(shape)))
    q, k, v = make_qkv(2, 2, 19, 37, 64, dtype=torch.float16, seed=3)
    keep = torch.rand(shape, generator=g) > (0.3 if shape[-1] > 1 else 0.2)
    mask = keep if kind == "bool" else torch.randn(shape, generator=g).masked_fill(~keep, -math.inf)
    _check_attention(q, k, v, mask=mask)


def test_attention_fully_masked_rows():
    """Rows that see no key: output 0, lse +inf, dq 0 (mask rows and bottom-right causal with Lq > Lk)."""
    q, k, v = make_qkv(2, 2, 70, 130, 64, dtype=torch.bfloat16, seed=9)
    keep = torch.rand(2, 2, 70, 130, generator=torch.Generator().manual_seed(9)) > 0.3
    keep[0, 1, 3] = False
    keep[1, :, 69] = False
    for mask in (keep, torch.zeros(keep.shape).masked_fill(~keep, -math.inf)):
        out, lse, (dq, _, _) = _check_attention(q, k, v, mask=mask)
        for t in (out, dq):
            assert torch.equal(t[0, 1, 3], torch.zeros_like(t[0, 1, 3]))
            assert torch.equal(t[1, :, 69], torch.zeros_like(t[1, :, 69]))
        assert lse[0, 1, 3] == math.inf and bool((lse[1, :, 69] == math.inf).all())
    q, k, v = make_qkv(1, 2, 100, 17, 64, dtype=torch.float16, seed=10)
    out, lse, (dq, _, _) = _check_attention(q, k, v, causal=True, bottom_right=True)
    assert torch.equal(out[:, :, :83], torch.zeros_like(out[:, :, :83]))
    assert torch.equal(dq[:, :, :83], torch.zeros_like(dq[:, :, :83]))
    assert bool((lse[:, :, :83] == math.inf).all()) and bool(lse[:, :, 83:].isfinite().all())


@pytest.mark.parametrize("big", [torch.finfo(torch.float32).min, -1e9], ids=["finfo.min", "-1e9"])
def test_attention_huge_mask_rows(big):
    """Rows whose every key carries one huge additive value: softmax is uniform there (torch's result); their lse
    cannot hold log2(l) in fp32, so the backward recomputes their statistics (pyattn/attn_exact_rows.h; -1e9 rows
    were below the old limit of -1e30 and got exp2(x - lse) = 1)."""
    q, k, v = make_qkv(2, 2, 70, 90, 64, dtype=torch.float16, seed=21)
    mask = torch.randn(2, 1, 70, 90, generator=torch.Generator().manual_seed(21))
    put_huge_mask_rows(q, mask, big)
    if big < -1e38:
        mask[0, 0, 7] = big  # a query that is not 0: at finfo.min its logits round to one value even in float64
    _check_attention(q, k, v, mask=mask)


def test_attention_nan_in_one_query_row_stays_in_that_row():
    q, k, v = make_qkv(1, 2, 77, 90, 64, dtype=torch.float16, seed=12)
    q[0, 1, 5] = math.nan
    out, _ = _fwd(q, k, v)
    expect = torch.zeros(out.shape[:-1], dtype=torch.bool)
    expect[0, 1, 5] = True
    assert torch.equal(out.isnan().any(-1), expect) and bool(out[0, 1, 5].isnan().all())


@pytest.mark.parametrize("causal,bottom_right", [(False, False), (True, True), (True, False)])
def test_attention_dropout_keep_mask_equals_cpu(causal, bottom_right):
    """The CUDA kernels drop exactly the elements the CPU kernels drop (the hash of pyattn/attn_dropout.h): with
    q = 0 every visible key gets P = 1 / n_i, and with v = I, out[i, j] = keep_ij / ((1 - p) n_i)."""
    b, hq, hkv, lq, lk, p = 2, 4, 2, 37, 70, 0.3
    seed, offset = 2**40 + 17, 3 * 2**33 + 5
    q = torch.zeros(b, hq, lq, 16, dtype=torch.float16)
    k = torch.randn(b, hkv, lk, 16, generator=torch.Generator().manual_seed(1)).half()
    v = torch.eye(lk, dtype=torch.float16).expand(b, hkv, lk, lk)
    out, _ = _fwd(q, k, v, None, p, causal, bottom_right, 1.0, seed, offset)
    keep = cpp.dropout_keep_mask(seed, offset, (b, hq, lq, lk), p)
    visible = causal_keep(lq, lk, bottom_right, "cpu") if causal else torch.ones(lq, lk, dtype=torch.bool)
    assert torch.equal(out != 0, keep & visible)
    n = visible.sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(out.float(), ((keep & visible) / ((1 - p) * n)).float(), atol=0, rtol=2e-3)



@pytest.mark.parametrize("lq,lk,d,causal,bottom_right", [(49, 30, 64, False, False), (60, 25, 128, True, True),
                                                         (25, 60, 96, True, False)])
def test_attention_dropout_forward_backward_vs_keep_mask(lq, lk, d, causal, bottom_right):
    b, hq, hkv, p, scale = 2, 4, 2, 0.25, 0.3
    seed, offset = 2**40 + 17, 3 * 2**33 + 5
    q, k, v = make_qkv(b, hq, lq, lk, d, hkv=hkv, dtype=torch.float16, seed=14)
    out, lse = _fwd(q, k, v, None, p, causal, bottom_right, scale, seed, offset)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(14)).half()
    grads = _bwd(dout, q, k, v, out, lse, None, p, causal, bottom_right, scale, seed, offset)
    keep = cpp.dropout_keep_mask(seed, offset, (b, hq, lq, lk), p)
    ref, ref_grads = attention_dropout_ref(q, k, v, keep, p, scale, causal, bottom_right, dout, torch.float64)
    low, low_grads = attention_dropout_ref(q, k, v, keep, p, scale, causal, bottom_right, dout, torch.float16)
    assert_attention_close(out, ref, low, 2)
    for name, g, r, lo in zip("qkv", grads, ref_grads, low_grads):
        assert_attention_close(g, r, lo, 3, name=f"d{name}")


@pytest.mark.parametrize("d,dv", [(64, 64), (128, 128), (256, 256), (59, 59), (128, 96)])
def test_attention_ldmatrix_is_bank_conflict_free(d, dv, monkeypatch):
    """Every ldmatrix phase of the forward and backward kernels (8 row addresses) hits 8 different 16-byte bank
    groups: one shared-memory wavefront each (the kPad = 8 row padding of attention_utils.cuh; with kPad = 0 the
    forward takes 8 wavefronts per phase). (The mma.sync kernels: the Hopper ones have no ldmatrix.)"""
    monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90", "0")
    monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90_BWD", "0")
    ops = torch.ops.pyattn_emu
    q, k, v = make_qkv(1, 2, 70, 90, d, dv=dv, dtype=torch.float16, seed=1)
    for run in ("fwd", "bwd"):
        ops.emu_reset_counters()
        if run == "fwd":
            out, lse = _fwd(q, k, v, causal=True)
        else:
            _bwd(torch.randn_like(out), q, k, v, out, lse, causal=True)
        phases, wavefronts, launches, blocks = ops.emu_counters()[:4]
        assert launches >= 1 and blocks >= 1 and phases > 0, run
        assert wavefronts == phases, f"{run}: {wavefronts} wavefronts for {phases} ldmatrix phases"


@pytest.mark.parametrize("d", [64, 128, 256])
def test_attention_smem_table_of_the_backend_matches_the_kernels(d, monkeypatch):
    """pyattn/backends/cuda.py refuses head dims whose kernels need more shared memory than the device allows from
    its _ATTN_SMEM table: that table must be what the launches really ask for (forward, largest backward kernel).
    (The mma.sync kernels, which every device >= 8.0 runs; the Hopper kernels run only where 227 KB are allowed.)"""
    from pyattn.backends.cuda import _ATTN_SMEM

    monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90", "0")
    monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90_BWD", "0")

    ops = torch.ops.pyattn_emu
    q, k, v = make_qkv(1, 1, 20, 20, d, dtype=torch.bfloat16, seed=2)
    ops.emu_reset_counters()
    out, lse = _fwd(q, k, v)
    fwd = ops.emu_counters()[4]
    ops.emu_reset_counters()
    _bwd(torch.randn_like(out), q, k, v, out, lse)
    assert (fwd, ops.emu_counters()[4]) == _ATTN_SMEM[d]


# (lq, lk, d, causal, bottom_right, hq, hkv): the Hopper forward's head dims, key blocks cut by the tail and the
# diagonal, GQA, query blocks with no key, several 128-row query blocks and 128-key blocks. The last P V covers 64,
# 128 or all of the last key block's keys (Steps::issue_pv_width): 260 keys = 2 x 128 + 4 (64 of 128), 400 = 2 x 176
# + 48 (64 of 176), 276 = 176 + 100 (128 of 176), 129 (all 176; 64 of 128 with ws128).
SM90_CASES = [
    (300, 260, 64, False, False, 4, 2),
    (300, 260, 128, True, False, 2, 1),
    (130, 300, 128, True, True, 2, 2),
    (300, 17, 64, True, True, 2, 1),
    (1, 129, 128, False, False, 2, 2),
    (130, 400, 128, False, False, 2, 1),
    (70, 276, 128, False, False, 2, 2),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case,variant", [(c, v) for c in SM90_CASES for v in ("default", "cp")] +
                         [(c, "ws128") for c in SM90_CASES if c[2] == 128 and not c[3]], ids=str)
def test_attention_sm90_forward(dtype, case, variant, monkeypatch):
    """The Hopper forward (csrc/cuda/attention_sm90.cu, wgmma; the emulator reports compute capability 9.0) runs
    where it should (it issues wgmma; a mask, dropout, another head dim or unaligned rows go to the mma.sync
    kernel), matches the oracle, gives the same bits in every 16-byte-aligned layout and close to the mma.sync
    kernel's values, and the backward takes its out and lse. The default is the warp-specialized kernel (TMA
    producer, mbarriers, ping-pong; key blocks of 176 at non-causal HD 128, else 128); variant "ws128": blocks of
    128 there too (its own rounding, checked like the default); "cp": the cp.async kernel (the same arithmetic per
    row in the same order, so the bits of the warp-specialized kernel with 128-key blocks), both under both copy
    completion models (PYATTN_EMU_CP_ASYNC late / early). The warp-specialized kernel gives the same bits with a
    block per tile (PYATTN_CUDA_ATTN_SM90=ws1) and persistent (the default) with a grid of 3 or 1 blocks looping over
    every tile (PYATTN_EMU_SMS: the emulated SM count), round-robin (wsp) or, causal, taking tiles from the dynamic
    scheduler's counter (wsd, the default; the emulator runs blocks one after another, so the first block takes its
    own tile and then every tile left, the others their first only)."""
    lq, lk, d, causal, bottom_right, hq, hkv = case
    ops = torch.ops.pyattn_emu

    def run_with(**env):  # the forward under these environment variables (None: unset) -> (out, lse), counters
        for key, value in env.items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        ops.emu_reset_counters()
        out = _fwd(*make_qkv(2, hq, lq, lk, d, hkv=hkv, dtype=dtype, seed=lq + d), causal=causal,
                   bottom_right=bottom_right)
        return out, ops.emu_counters()

    def assert_same_bits(runs):
        for (out, lse), _ in runs[1:]:
            assert torch.equal(out, runs[0][0][0]) and torch.equal(lse, runs[0][0][1])

    if variant == "cp":  # (against 128-key blocks: the default at non-causal HD 128 has 176)
        runs = [run_with(PYATTN_CUDA_ATTN_SM90=env, PYATTN_EMU_CP_ASYNC=cp) for env in ("ws128", "cp")
                for cp in ("early", "late")]
        smem = [counters[4] for _, counters in runs]
        assert smem[0] == smem[1] != smem[2] == smem[3]  # the two kernels' shared memory
        assert_same_bits(runs)
    if variant == "default":  # persistent: blocks of a small grid take several tiles each (3 SMs), vs one each
        configs = (("ws1", "3"), ("wsp", "3"), ("wsp", "1"), ("wsd", "3"), ("wsd", "1"), (None, "3"))
        runs = [run_with(PYATTN_CUDA_ATTN_SM90=env, PYATTN_EMU_SMS=sms) for env, sms in configs]
        tiles = (lq + 127) // 128 * 2 * hq
        for (env, sms), (_, counters) in zip(configs, runs):
            persistent = env != "ws1"
            assert counters[3] == (min(tiles, int(sms)) if persistent else tiles), (env, sms)  # blocks
        assert_same_bits(runs)
        monkeypatch.delenv("PYATTN_EMU_SMS")
        monkeypatch.delenv("PYATTN_CUDA_ATTN_SM90", raising=False)
    if variant == "ws128":
        monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90", "ws128")
    q, k, v = make_qkv(2, hq, lq, lk, d, hkv=hkv, dtype=dtype, seed=lq + d)
    # (the counter below is the largest launch's shared memory, and the default backward's fused dK / dV kernel takes
    # more than the forward: the backward's unfused pair here)
    monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90_BWD", "ws")
    ops.emu_reset_counters()
    out, lse, _ = _check_attention(q, k, v, causal=causal, bottom_right=bottom_right, seed=d)
    assert ops.emu_counters()[5] > 0
    if variant != "cp" and d == 128:  # WsCfg<128, BN>::smem: slack, Q, 2 stages of K and V, mbarriers, tile slots,
        bn = 176 if variant == "default" and not causal else 128  # pin scratch
        assert ops.emu_counters()[4] == 1024 + 128 * 128 * 2 + 4 * bn * 128 * 2 + 10 * 8 + 2 * 8 + 256 * 8
    for layout in ("blhd", "packed"):
        q2, k2, v2 = make_qkv(2, hq, lq, lk, d, hkv=hkv, dtype=dtype, layout=layout, seed=lq + d)
        out2, lse2 = _fwd(q2, k2, v2, causal=causal, bottom_right=bottom_right)
        assert torch.equal(out2, out) and torch.equal(lse2, lse), layout
    monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90", "0")
    ops.emu_reset_counters()
    out_mma, lse_mma = _fwd(q, k, v, causal=causal, bottom_right=bottom_right)
    assert ops.emu_counters()[5] == 0
    torch.testing.assert_close(out.float(), out_mma.float(), atol=2e-2, rtol=0)
    assert torch.equal(lse.isinf(), lse_mma.isinf())
    torch.testing.assert_close(lse[lse.isfinite()], lse_mma[lse.isfinite()], atol=1e-4, rtol=0)


def test_attention_sm90_forward_leaves_the_rest_to_mma_sync():
    """A mask, dropout, another head dim or D != Dv, and unaligned rows take the mma.sync forward (no wgmma)."""
    ops = torch.ops.pyattn_emu
    q, k, v = make_qkv(1, 2, 40, 50, 64, dtype=torch.bfloat16, seed=3)
    mask = torch.ones(1, 1, 40, 50, dtype=torch.bool).tril()
    calls = {
        "mask": lambda: _fwd(q, k, v, mask),
        "dropout": lambda: _fwd(q, k, v, p=0.25, seed=1),
        "head dim 96": lambda: _fwd(*make_qkv(1, 2, 40, 50, 96, dtype=torch.bfloat16, seed=3)),
        "D != Dv": lambda: _fwd(*make_qkv(1, 2, 40, 50, 64, dv=128, dtype=torch.bfloat16, seed=3)),
        "unaligned": lambda: _fwd(*make_qkv(1, 2, 40, 50, 64, dtype=torch.bfloat16, layout="nan_padded", seed=3)),
    }
    for name, call in calls.items():
        ops.emu_reset_counters()
        call()
        assert ops.emu_counters()[2] >= 1 and ops.emu_counters()[5] == 0, name


# (lq, lk, d, causal, bottom_right, hq, hkv): the Hopper backward's head dims; key blocks of 128 and query blocks of
# 64 / 128 cut by the tails and the causal diagonal in both alignments; GQA groups (dK / dV summed over the group);
# query rows that see no key (dQ 0) and key blocks that no query sees (dK, dV 0); B Hq Lq = 66 rows, so that the fused
# dQ accumulator after lse2, l2 and delta (3 x 66 floats) needs its 16-byte rounding.
SM90_BWD_CASES = SM90_CASES[:5] + [(17, 300, 128, True, False, 4, 2), (33, 200, 128, True, True, 1, 1)]


def _sm90_bwd(q, k, v, causal, bottom_right, seed):
    """Forward, then backward with a fixed dout -> (out, lse, dout, grads, wgmma count of the backward)."""
    ops = torch.ops.pyattn_emu
    out, lse = _fwd(q, k, v, causal=causal, bottom_right=bottom_right)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(q.dtype)
    ops.emu_reset_counters()
    grads = _bwd(dout, q, k, v, out, lse, causal=causal, bottom_right=bottom_right)
    return out, lse, dout, grads, ops.emu_counters()[5]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SM90_BWD_CASES, ids=str)
def test_attention_sm90_backward(dtype, case, monkeypatch):
    """The Hopper backward (csrc/cuda/attention_sm90_bwd.cu: wgmma dK / dV and dQ kernels) runs where it should
    (it issues wgmma), matches the float64 oracle with TESTING.md's 3x rule, gives the same bits in every
    16-byte-aligned layout and with either dK / dV kernel beside the dQ kernel (PYATTN_CUDA_ATTN_SM90_BWD=ws: the
    warp-specialized one, TMA producer, mbarriers; =cp: the cp.async one; the same steps in the same order), dQ added
    by the warp-specialized kernel within the oracle's rule (the default, also named =fused: bulk reductions from
    shared memory; =fusedat: float4 atomics; deterministic mode: ws's dQ kernel instead), and values close to the
    mma.sync backward's (=0)."""
    lq, lk, d, causal, bottom_right, hq, hkv = case
    q, k, v = make_qkv(2, hq, lq, lk, d, hkv=hkv, dtype=dtype, seed=lq + lk + d)
    monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90_BWD", "ws")  # (the deterministic pair: the bits the others are held to)
    out, lse, dout, grads, wgmma = _sm90_bwd(q, k, v, causal, bottom_right, seed=d)
    assert wgmma > 0
    _, _, ref_grads = attention_ref(q, k, v, causal=causal, bottom_right=bottom_right, dout=dout)
    _, low_grads = attention_low(q, k, v, causal=causal, bottom_right=bottom_right, dout=dout)
    for name, g, r, lo in zip("qkv", grads, ref_grads, low_grads):
        assert_attention_close(g, r, lo, 3, name=f"d{name}")
    ws_smem = 1024 + (2 * 128 + 4 * 64) * d * 2 + 2 * 3 * 64 * 4 + 5 * 8  # the ws kernel's: + 5 mbarriers
    for variant in ("ws", "cp"):
        monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90_BWD", variant)
        torch.ops.pyattn_emu.emu_reset_counters()
        for a, b in zip(_bwd(dout, q, k, v, out, lse, causal=causal, bottom_right=bottom_right), grads):
            assert torch.equal(a, b), variant
        assert (torch.ops.pyattn_emu.emu_counters()[4] == ws_smem) == (variant == "ws"), variant
    # fused: dK, dV as before, dQ added by the dK / dV kernel (bulk reductions or atomics into fp32, then
    # converted: another summation order, so the oracle's rule and close to the dQ kernel's); deterministic mode: the
    # dQ kernel
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    for variant, extra_smem in ((None, 2 * 128 * 64 * 2 + 2 * 64 * 64 * 4), ("fusedat", 2 * 128 * 64 * 2)):
        if variant is None:  # (the default: bulk reductions; + two dS^T tiles, bulk: + two dQ staging chunks)
            monkeypatch.delenv("PYATTN_CUDA_ATTN_SM90_BWD")
        else:
            monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90_BWD", variant)
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            try:
                torch.ops.pyattn_emu.emu_reset_counters()
                fused = _bwd(dout, q, k, v, out, lse, causal=causal, bottom_right=bottom_right)
            finally:
                torch.use_deterministic_algorithms(was_deterministic)
            smem = torch.ops.pyattn_emu.emu_counters()[4]
            assert torch.equal(fused[1], grads[1]) and torch.equal(fused[2], grads[2])
            if not deterministic:
                assert smem == ws_smem + extra_smem, variant
                assert_attention_close(fused[0], ref_grads[0], low_grads[0], 3, name=f"dq ({variant})")
                tol = 2e-2 * float(grads[0].float().abs().max()) + 1e-3
                torch.testing.assert_close(fused[0].float(), grads[0].float(), atol=tol, rtol=0)
            else:
                assert smem == ws_smem and torch.equal(fused[0], grads[0]), variant
    def blhd(t):  # the same values in (B, L, H, D) strides
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    for layout in ("blhd", "packed"):
        q2, k2, v2 = make_qkv(2, hq, lq, lk, d, hkv=hkv, dtype=dtype, layout=layout, seed=lq + lk + d)
        for variant in ("ws", "cp"):  # (the warp-specialized kernel's TMA maps take dout's strides too)
            monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90_BWD", variant)
            dout2, out2 = (blhd(t) if layout == "blhd" else t for t in (dout, out))
            for a, b in zip(_bwd(dout2, q2, k2, v2, out2, lse, causal=causal, bottom_right=bottom_right), grads):
                assert torch.equal(a, b), (layout, variant)
    monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90_BWD", "0")
    torch.ops.pyattn_emu.emu_reset_counters()
    mma = _bwd(dout, q, k, v, out, lse, causal=causal, bottom_right=bottom_right)
    assert torch.ops.pyattn_emu.emu_counters()[5] == 0
    for name, a, b in zip("qkv", grads, mma):
        tol = 2e-2 * float(b.float().abs().max()) + 1e-3
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=0, msg=f"d{name} vs the mma.sync backward")


@pytest.mark.parametrize("variant,d", [("ws", 64), ("cp", 64), (None, 128), (None, 64), ("fusedat", 128)])
def test_attention_sm90_backward_thread_orders_give_the_same_bits(order, variant, d, monkeypatch):
    """Every schedule of threads and copy completion gives the bits of the default one: the double buffers are
    refilled only after every warpgroup is done with them (block barriers; mbarriers in the warp-specialized
    kernel, and a named barrier before the fused dQ reads both warpgroups' dS^T); the fused dQ's bulk reductions read
    their staging tile after the warpgroup wrote it and before it is rewritten (the emulator's early / late copies
    read it at issue / at the wait)."""
    if variant is not None:
        monkeypatch.setenv("PYATTN_CUDA_ATTN_SM90_BWD", variant)
    q, k, v = make_qkv(1, 4, 130, 200, d, hkv=2, dtype=torch.bfloat16, seed=9)
    *_, grads, wgmma = _sm90_bwd(q, k, v, True, False, seed=9)
    assert wgmma > 0
    os.environ["PYATTN_EMU_ORDER"], os.environ["PYATTN_EMU_CP_ASYNC"] = "forward", "late"  # (restored by `order`)
    *_, base, _ = _sm90_bwd(q, k, v, True, False, seed=9)
    for a, b in zip(grads, base):
        assert torch.equal(a, b), order


def test_attention_sm90_backward_leaves_the_rest_to_mma_sync():
    """A mask, dropout, another head dim or D != Dv, and unaligned rows take the mma.sync backward (no wgmma)."""
    ops = torch.ops.pyattn_emu
    q, k, v = make_qkv(1, 2, 40, 50, 64, dtype=torch.bfloat16, seed=3)
    mask = torch.ones(1, 1, 40, 50, dtype=torch.bool).tril()
    cases = {
        "mask": ((q, k, v), dict(mask=mask)),
        "dropout": ((q, k, v), dict(p=0.25, seed=1)),
        "head dim 96": (make_qkv(1, 2, 40, 50, 96, dtype=torch.bfloat16, seed=3), {}),
        "D != Dv": (make_qkv(1, 2, 40, 50, 64, dv=128, dtype=torch.bfloat16, seed=3), {}),
        "unaligned": (make_qkv(1, 2, 40, 50, 64, dtype=torch.bfloat16, layout="nan_padded", seed=3), {}),
    }
    for name, (qkv, kw) in cases.items():
        out, lse = _fwd(*qkv, **kw)
        ops.emu_reset_counters()
        _bwd(torch.ones_like(out), *qkv, out, lse, **kw)
        assert ops.emu_counters()[2] >= 1 and ops.emu_counters()[5] == 0, name


@pytest.mark.parametrize("b,hq,hkv,d", [(1, 5, 5, 128), (2, 3, 3, 64), (1, 6, 3, 128)], ids=str)
def test_attention_l2_sections_give_the_same_bits(b, hq, hkv, d, monkeypatch):
    """Causal grids number their tiles in L2 sections of heads (attention_utils.cuh l2_section_tile, sized by derive
    from the device's L2; PYATTN_EMU_L2 shrinks the emulated one): every tile is computed once whatever the sections
    (sections of one head; of 2 (q heads: 2 groups at GQA 2) with a smaller last one where the heads do not divide;
    one section of all heads, the 50 MiB default; PYATTN_CUDA_ATTN_L2=0), in every forward kernel (the Hopper
    warp-specialized one with a block per tile, persistent round-robin and dynamic, the cp.async one, mma.sync) and
    backward (Hopper dK / dV + dQ, its warp-specialized dK / dV, mma.sync dK / dV + dQ): the same bits."""
    lq = lk = 200
    kv_bytes = lk * 2 * d * 2  # K and V of a kv head (= Q and dO of a query head)
    q, k, v = make_qkv(b, hq, lq, lk, d, hkv=hkv, dtype=torch.bfloat16, seed=b + hq + d)
    dout = torch.randn(b, hq, lq, d, generator=torch.Generator().manual_seed(d)).to(torch.bfloat16)

    def env(name, value):  # (None: unset)
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)

    env("PYATTN_EMU_SMS", "3")  # (persistent grids: blocks take several tiles)
    sections = {"one head": ("1", None), "2.5 heads' data": (str(4 * kv_bytes), None), "all": (None, None),
                "off": (None, "0")}  # -> (PYATTN_EMU_L2, PYATTN_CUDA_ATTN_L2); derive's budget is 5/8 of the L2
    runs = {}
    for name, (emu_l2, switch) in sections.items():
        env("PYATTN_EMU_L2", emu_l2)
        env("PYATTN_CUDA_ATTN_L2", switch)
        for kernel in (None, "ws1", "wsp", "wsd", "cp", "0"):
            env("PYATTN_CUDA_ATTN_SM90", kernel)
            runs[name, "fwd", kernel] = _fwd(q, k, v, causal=True)
        env("PYATTN_CUDA_ATTN_SM90", None)
        out, lse = runs[name, "fwd", None]
        for kernel in ("ws", "cp", "0"):  # (not the default's fused dQ: its bits follow the blocks' order)
            env("PYATTN_CUDA_ATTN_SM90_BWD", kernel)
            runs[name, "bwd", kernel] = _bwd(dout, q, k, v, out, lse, causal=True)
        env("PYATTN_CUDA_ATTN_SM90_BWD", None)
    for (name, kind, kernel), result in runs.items():
        for a, ref in zip(result, runs["all", kind, kernel]):
            assert torch.equal(a, ref), (name, kind, kernel)


# (b, hq, hkv, lq, lk, d, causal, bottom_right): calls the split-KV decoding path takes (group * Lq <= 8 query rows
# of a kv head, Lk >= 256): one row per kv head, a GQA group of 8 over 8 splits, 3 rows (a 4-row tile), several query
# rows with both causal alignments (top-left with Lq < Lk: whole splits no row sees), a key count no split divides.
DECODE_CASES = [
    (2, 4, 2, 1, 300, 64, False, False),
    (1, 8, 1, 1, 1000, 128, False, False),
    (1, 6, 2, 1, 257, 128, True, True),
    (3, 2, 2, 3, 400, 64, True, True),
    (1, 2, 1, 4, 256, 128, True, False),
    (2, 2, 2, 2, 700, 128, False, False),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_attention_decode_split_kv(dtype, case, monkeypatch):
    """The decoding forward (csrc/cuda/attention_decode.cu: a block per (split of the keys, kv head, batch) with the
    kv head's whole query group, then a combining kernel) runs where it should (two launches, no wgmma, no dynamic
    shared memory), matches the oracle (out, lse; the backward takes them), gives the same bits in every layout with
    16-byte-aligned rows and in both thread orders, and is close to the regular forward (PYATTN_CUDA_ATTN_DECODE=0)."""
    b, hq, hkv, lq, lk, d, causal, bottom_right = case
    monkeypatch.setenv("PYATTN_EMU_SMS", "4")  # (about four blocks per SM: several splits per kv head)
    ops = torch.ops.pyattn_emu
    q, k, v = make_qkv(b, hq, lq, lk, d, hkv=hkv, dtype=dtype, seed=lk + d)
    ops.emu_reset_counters()
    out, lse = _fwd(q, k, v, causal=causal, bottom_right=bottom_right)
    launches, wgmma, smem = ops.emu_counters()[2], ops.emu_counters()[5], ops.emu_counters()[4]
    assert (launches, wgmma, smem) == (2, 0, 0)
    got, got_lse, _ = _check_attention(q, k, v, causal=causal, bottom_right=bottom_right, seed=d)
    assert torch.equal(got, out) and torch.equal(got_lse, lse)
    for layout in ("blhd", "expanded") + (("packed",) if lq == lk else ()):
        q2, k2, v2 = make_qkv(b, hq, lq, lk, d, hkv=hkv, dtype=dtype, layout=layout, seed=lk + d)
        if layout == "expanded":  # (k, v repeat over the batch: compare with the same values, contiguous)
            q, k, v = q2, k2.contiguous(), v2.contiguous()
            out, lse = _fwd(q, k, v, causal=causal, bottom_right=bottom_right)
        out2, lse2 = _fwd(q2, k2, v2, causal=causal, bottom_right=bottom_right)
        assert torch.equal(out2, out) and torch.equal(lse2, lse), layout
    monkeypatch.setenv("PYATTN_EMU_ORDER", "reverse")
    out_r, lse_r = _fwd(q, k, v, causal=causal, bottom_right=bottom_right)
    assert torch.equal(out_r, out) and torch.equal(lse_r, lse)
    monkeypatch.setenv("PYATTN_CUDA_ATTN_DECODE", "0")
    ops.emu_reset_counters()
    out_reg, lse_reg = _fwd(q, k, v, causal=causal, bottom_right=bottom_right)
    assert ops.emu_counters()[2] == 1
    torch.testing.assert_close(out.float(), out_reg.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(lse, lse_reg, atol=1e-4, rtol=0)


def test_attention_decode_leaves_the_rest_to_the_regular_forward(monkeypatch):
    """Calls the decoding path does not take run the regular forward (one launch): more than 8 query rows per kv head,
    fewer than 256 keys, a mask, dropout, head dim 96, unaligned rows, float16 with D != Dv."""
    ops = torch.ops.pyattn_emu
    qkv = lambda b, hq, lq, lk, d, **kw: make_qkv(b, hq, lq, lk, d, dtype=torch.bfloat16, seed=5, **kw)  # noqa: E731
    q, k, v = qkv(1, 2, 1, 300, 64)
    calls = {
        "9 rows": lambda: _fwd(*qkv(1, 9, 1, 300, 64, hkv=1)),
        "255 keys": lambda: _fwd(*qkv(1, 2, 1, 255, 64)),
        "mask": lambda: _fwd(q, k, v, torch.ones(1, 1, 1, 300, dtype=torch.bool)),
        "dropout": lambda: _fwd(q, k, v, p=0.25, seed=1),
        "head dim 96": lambda: _fwd(*qkv(1, 2, 1, 300, 96)),
        "D != Dv": lambda: _fwd(*qkv(1, 2, 1, 300, 64, dv=128)),
        "unaligned": lambda: _fwd(*qkv(1, 2, 1, 300, 64, layout="nan_padded")),
    }
    for name, call in calls.items():
        ops.emu_reset_counters()
        call()
        assert ops.emu_counters()[2] == 1, name


def test_attention_refusals_name_the_problem():
    q, k, v = make_qkv(1, 2, 16, 16, 64)
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        _fwd(q, k, v)
    q, k, v = make_qkv(1, 2, 16, 16, 300, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"head dims up to 256 \(got D = 300, Dv = 300\)"):
        _fwd(q, k, v)
    q, k, v = make_qkv(0, 2, 16, 16, 64, dtype=torch.float16)
    out, lse = _fwd(q, k, v)
    assert out.shape == (0, 2, 16, 64) and lse.shape == (0, 2, 16)


# ---- LayerNorm / RMSNorm ----------------------------------------------------------------------------------------
# Shapes cross every configuration of csrc/cuda/layer_norm.cu: row groups of 8 .. 512 threads (several rows per block
# for short rows), the looped kernel past 8192 columns, and the chunked dweight/dbias reduction (one chunk, many).

def _ln_fwd(x, r, w, b, rms=False, store=True, eps=1e-5):
    return torch.ops.pyattn_emu.layer_norm_fwd(x, r, w, b, eps, rms, store)


def _ln_bwd(dy, s, w, mean, rstd, dres, rms=False, has_bias=True, need_dweight=True):
    return torch.ops.pyattn_emu.layer_norm_bwd(dy, s, w, mean, rstd, dres, rms, has_bias, need_dweight)



NORM_SHAPES = [(1, 1), (3, 7), (5, 64), (33, 65), (2, 127), (17, 256), (4, 257), (9, 1000), (3, 1023), (4, 1500),
               (3, 2048), (2, 4096), (2, 8192), (2, 8193), (2, 12000)]


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
def test_norm_vs_oracle(rms, dtype, param_dtype):
    g = torch.Generator().manual_seed(0)
    pdt = torch.float32 if param_dtype == "float32" else dtype
    for m, n in NORM_SHAPES:
        x, r, dy, ds = (torch.randn(m, n, generator=g).to(dtype) for _ in range(4))
        w = (1 + 0.5 * torch.randn(n, generator=g)).to(pdt)
        b = None if rms else (0.5 * torch.randn(n, generator=g)).to(pdt)
        y, s, mean, rstd = _ln_fwd(x, r, w, b, rms)
        assert y.dtype == dtype and torch.equal(s, x + r), (m, n)
        dx, dw, db = _ln_bwd(dy, s, w, mean, rstd, ds, rms, b is not None)
        y64, (dx64, *dp64) = norm_ref(s, w, b, 1e-5, rms, dy, ds)
        what = f"{'rms' if rms else 'ln'} {dtype} params {pdt} shape {(m, n)}"
        assert_tol(y, y64, "layer_norm", dtype, msg=lambda msg: f"{what} y: {msg}")
        assert_tol(dx, dx64, "layer_norm", dtype, "bwd", msg=lambda msg: f"{what} dx: {msg}")
        for name, got, want in zip(("dweight", "dbias"), (dw, db), dp64):
            assert got.dtype == pdt
            assert_tol(got, want, "layer_norm", pdt, "bwd", msg=lambda msg: f"{what} {name}: {msg}")



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [7, 64, 1000, 1024, 8200])
def test_norm_layouts_bit_identical(dtype, n):
    """Row strides that keep 16-byte vectors (pad 8), that break them (pad 3), a base off alignment: the vector and
    element paths give the same bits, and NaN past each row's end never leaks in."""
    m, rms = 19, n % 2 == 0
    g = torch.Generator().manual_seed(n)
    x, r, dy, dres = (torch.randn(m, n, generator=g).to(dtype) for _ in range(4))
    w = 1 + 0.5 * torch.randn(n, generator=g)
    b = None if rms else 0.5 * torch.randn(n, generator=g)
    y0, s0, mean0, rstd0 = _ln_fwd(x, r, w, b, rms)
    dx0, dw0, db0 = _ln_bwd(dy, s0, w, mean0, rstd0, dres, rms, b is not None)
    for pad, shift in ((8, 0), (3, 0), (8, 1)):
        xv, rv, dyv, dresv = (nan_padded_rows(t, pad, shift) for t in (x, r, dy, dres))
        y, s, mean, rstd = _ln_fwd(xv, rv, w, b, rms)
        assert torch.equal(y, y0) and torch.equal(s, s0) and torch.equal(rstd, rstd0), (pad, shift)
        dx, dw, db = _ln_bwd(dyv, nan_padded_rows(s0, pad, shift), w, mean0, rstd0, dresv, rms, b is not None)
        assert torch.equal(dx, dx0) and torch.equal(dw, dw0) and torch.equal(db, db0), (pad, shift)


def test_norm_weight_grads_deterministic_across_orders(order, monkeypatch):
    """Many dweight/dbias chunks, then the fixed-order reduce: the oracle's result, bitwise equal in every schedule
    and with outputs / workspace NaN-filled first (PYATTN_DEBUG_NAN_FILL=1: every element written before read)."""
    m, n = 700, 64
    g = torch.Generator().manual_seed(7)
    x, dy = (torch.randn(m, n, generator=g).to(torch.bfloat16) for _ in range(2))
    w, b = 1 + 0.5 * torch.randn(n, generator=g), 0.5 * torch.randn(n, generator=g)
    _, _, mean, rstd = _ln_fwd(x, None, w, b, False, False)
    got = _ln_bwd(dy, x, w, mean, rstd, None)
    _, (dx64, dw64, db64) = norm_ref(x, w, b, 1e-5, False, dy, torch.zeros_like(dy))
    assert_tol(got[0], dx64, "layer_norm", torch.bfloat16, "bwd")
    assert_tol(got[1], dw64, "layer_norm", torch.float32, "bwd")
    assert_tol(got[2], db64, "layer_norm", torch.float32, "bwd")
    monkeypatch.setenv("PYATTN_EMU_ORDER", "forward")
    monkeypatch.setenv("PYATTN_EMU_CP_ASYNC", "late")
    monkeypatch.setenv("PYATTN_DEBUG_NAN_FILL", "1")
    again = _ln_bwd(dy, x, w, mean, rstd, None)
    assert all(torch.equal(a, c) for a, c in zip(got, again))


def test_norm_offset_constant_and_nan_rows():
    n = 1000
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, n, generator=g) * 0.1 + 1000.0
    x[1] = 3.0
    x[2, n // 2] = float("nan")
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    y = _ln_fwd(x, None, w, b, False, False)[0]
    ref = F.layer_norm(x.double(), (n,), w.double(), b.double())
    keep = [0, 3, 4]
    torch.testing.assert_close(y[keep].double(), ref[keep], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(y[1], b)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("n", [8, 1000, 9000], ids=lambda n: f"N{n}")  # register kernels and the looped one
def test_norm_infinite_sums_as_the_cpu_kernel(n):
    # A row whose sum of squares is infinite (an inf element for RMSNorm; finite values near 1e20 for LayerNorm):
    # rstd 0, as the CPU kernel gives, not NaN over the whole row (div_n's correction step made inf - inf).
    g = torch.Generator().manual_seed(n)
    w, b = 1 + 0.5 * torch.randn(n, generator=g), torch.full((n,), 0.25)
    x = torch.randn(3, n, generator=g)
    x[0, 3] = float("inf")
    x[1] *= 1e20
    for rms in (False, True):
        bias = None if rms else b
        got = _ln_fwd(x, None, w, bias, rms, False)
        want = torch.ops.pyattn.layer_norm_fwd(x, None, w, bias, 1e-5, rms, False)
        for name, a, c in zip(("y", "s", "mean", "rstd"), got, want):
            torch.testing.assert_close(a, c, equal_nan=True, msg=lambda m: f"{'rms' if rms else 'ln'} {name}: {m}")
        assert got[3][1] == 0 and not torch.isnan(got[0][1]).any()


def test_norm_empty_rows_and_bad_input():
    x = torch.empty(0, 16)
    w, b = torch.randn(16), torch.randn(16)
    y, s, mean, rstd = _ln_fwd(x, x, w, b)
    assert y.shape == (0, 16) and mean.shape == (0,)
    dx, dw, db = _ln_bwd(x, x, w, mean, rstd, None)
    assert dx.shape == (0, 16) and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))
    with pytest.raises(RuntimeError, match="weight"):
        _ln_fwd(torch.randn(4, 16), None, torch.randn(15), None)


# ---- GRU ----------------------------------------------------------------------------------------------------------

def _gru_params(isz, hsz, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = hsz ** -0.5
    return tuple(((torch.rand(*s, generator=g) * 2 - 1) * k).to(dtype)
                 for s in ((3 * hsz, isz), (3 * hsz, hsz), (3 * hsz,), (3 * hsz,)))


def _gru_seq_data(seed, seq, bsz, isz, hsz, dtype):
    """A layer call's data in `dtype`: x, h0 (in [-1, 1)), dout, dh_last from one generator seeded `seed`, then
    _gru_params(isz, hsz, dtype, seed=seq): (x, h0, dout, dh_last, w_ih, w_hh, b_ih, b_hh)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(seq, bsz, isz, generator=g).to(dtype)
    h0 = (torch.rand(bsz, hsz, generator=g) * 2 - 1).to(dtype)
    dout = torch.randn(seq, bsz, hsz, generator=g).to(dtype)
    dh_last = torch.randn(bsz, hsz, generator=g).to(dtype)
    return (x, h0, dout, dh_last, *_gru_params(isz, hsz, dtype, seed=seq))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seq,bsz,isz,hsz", [(1, 1, 3, 5), (3, 3, 33, 70), (5, 4, 16, 129), (2, 2, 8, 1024)])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("path", ["persistent", "steps"])
def test_gru_layer_vs_oracle(monkeypatch, dtype, seq, bsz, isz, hsz, reverse, path):
    """gru_seq_fwd / gru_seq_bwd against the torch backend in float64 on the same rounded values: the persistent
    kernels as the plan sizes them (H 1024: 128 blocks of 8 units on the emulator's 132 SMs, and their grid
    barriers), and the per-step path (a GEMM in the binding and a fused gate launch per step)."""
    from pyattn.dispatch import get_backend

    if path == "steps":
        monkeypatch.setenv("PYATTN_CUDA_GRU_BLOCKS", "0")

    x, h0, dout, dh_last, w_ih, w_hh, b_ih, b_hh = _gru_seq_data(seq * 131 + hsz, seq, bsz, isz, hsz, dtype)
    ops = torch.ops.pyattn_emu
    out, h_last, ws = ops.gru_seq_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, True)
    grads = ops.gru_seq_bwd(dout, dh_last, x, h0, w_ih, w_hh, out, ws, True, True, reverse, True)
    ref = get_backend("torch")
    args64 = [t.double() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    r_out, r_h, r_ws = ref.gru_layer_fwd(*args64, reverse, True)
    r_grads = ref.gru_layer_bwd(dout.double(), dh_last.double(), *args64[:4], r_out, r_ws, True, True, reverse, True)
    assert_tol(out, r_out, "gru", dtype)
    assert_tol(h_last, r_h, "gru", dtype)
    assert_tol(ws, r_ws, "gru", torch.float32 if dtype == torch.float32 else dtype)
    for name, got, want in zip(("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"), grads, r_grads):
        assert got.shape == want.shape, name
        assert_tol(got, want, "gru", dtype, kind="bwd", msg=lambda msg: f"{name}: {msg}")


# (seq, bsz, isz, hsz, PYATTN_CUDA_GRU_BLOCKS, PYATTN_EMU_SMEM_OPTIN): one block; 3 and 4 blocks with a shorter last
# one; more blocks asked for than units (capped: a unit each); the batch staged in 2 (forward) and 5 (backward)
# chunks under a 4 KiB shared-memory budget, on 2 blocks; one step
_GRU_GRIDS = [(4, 5, 7, 13, "1", None), (3, 9, 5, 70, "3", None), (5, 3, 4, 33, "4", None),
              (2, 3, 4, 6, "9", None), (3, 20, 3, 13, "2", "4096"), (1, 2, 3, 5, None, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seq,bsz,isz,hsz,blocks,optin", _GRU_GRIDS,
                         ids=["1block", "3blocks", "4blocks", "capped", "chunked", "one-step"])
def test_gru_persistent_kernels(order, monkeypatch, dtype, seq, bsz, isz, hsz, blocks, optin):
    """gru_rec_fwd / gru_rec_bwd (each direction in one cooperative launch: W_hh in the blocks' shared memory, a grid
    barrier per step) against the float64 oracle, forward and reverse, with and without dh_last; every grid gives
    the bits of a single block (each dot product is summed in the same order whatever the grid), and in float32 the
    per-step path (PYATTN_CUDA_GRU_BLOCKS=0) agrees within rounding."""
    from pyattn.dispatch import get_backend

    monkeypatch.setenv("PYATTN_EMU_SMS", "2")  # at most 8 co-resident blocks (the emulator's occupancy model)
    if optin is not None:
        monkeypatch.setenv("PYATTN_EMU_SMEM_OPTIN", optin)
    x, h0, dout, dh_last, w_ih, w_hh, b_ih, b_hh = _gru_seq_data(seq * 31 + hsz, seq, bsz, isz, hsz, dtype)
    ops, ref = torch.ops.pyattn_emu, get_backend("torch")
    args64 = [t.double() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]

    def run(grid, reverse, carried):
        if grid is None:
            monkeypatch.delenv("PYATTN_CUDA_GRU_BLOCKS", raising=False)
        else:
            monkeypatch.setenv("PYATTN_CUDA_GRU_BLOCKS", grid)
        out, h_last, ws = ops.gru_seq_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, True)
        grads = ops.gru_seq_bwd(dout, carried, x, h0, w_ih, w_hh, out, ws, True, True, reverse, True)
        return (out, h_last, ws, *grads)

    names = ("out", "h_last", "ws", "dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh")
    for reverse in (False, True):
        carried = dh_last if reverse else None
        got = run(blocks, reverse, carried)
        r_out, r_h, r_ws = ref.gru_layer_fwd(*args64, reverse, True)
        r_dh = torch.zeros_like(args64[1]) if carried is None else carried.double()
        r_grads = ref.gru_layer_bwd(dout.double(), r_dh, *args64[:4], r_out, r_ws, True, True, reverse, True)
        for name, a, want in zip(names, got, (r_out, r_h, r_ws, *r_grads)):
            kind = "bwd" if name.startswith("d") else "fwd"
            wdtype = torch.float32 if name == "ws" and dtype == torch.float32 else dtype
            assert_tol(a, want, "gru", wdtype, kind=kind, msg=lambda msg: f"{name}: {msg}")
        if blocks not in ("1", None):
            for name, a, b in zip(names, got, run("1", reverse, carried)):
                assert torch.equal(a, b), f"{name}: {blocks} blocks and one block differ"
        if dtype == torch.float32:  # (16-bit states round to different neighbours now and then, and it carries)
            for name, a, b in zip(names, got, run("0", reverse, carried)):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=lambda msg: f"{name} vs per-step: {msg}")


@pytest.mark.parametrize("bsz,hsz,blocks", [(2, 12, 4), (3, 3, 3), (4, 210, 0)], ids=["sms", "units", "steps"])
def test_gru_plan_a_block_per_sm_until_a_block_has_too_much_work(monkeypatch, bsz, hsz, blocks):
    """The plan (csrc/cuda/gru.cu rec_plan, sized from the H200's grids): one launch per direction and pass on a
    block per SM (4 emulated SMs), fewer when H has fewer units, and the per-step path (a gate launch per step, the
    bits of PYATTN_CUDA_GRU_BLOCKS=0) once a block would do over 2^17 multiply-adds a step (4 x 3 x 210^2 > 4 x
    2^17)."""
    monkeypatch.setenv("PYATTN_EMU_SMS", "4")
    monkeypatch.setenv("PYATTN_CUDA_GRU_ONE_BLOCK", "0")  # (the grid's plan; the one-block kernel: its own test)
    seq, isz = 3, 5
    g = torch.Generator().manual_seed(hsz)
    x, h0 = torch.randn(seq, bsz, isz, generator=g), torch.randn(bsz, hsz, generator=g)
    w = _gru_params(isz, hsz, torch.float32, seed=hsz)
    dout = torch.randn(seq, bsz, hsz, generator=g)
    ops = torch.ops.pyattn_emu

    def run():
        ops.emu_reset_counters()
        out, h_last, ws = ops.gru_seq_fwd(x, h0, *w, False, True)
        fwd = ops.emu_counters()
        ops.emu_reset_counters()
        grads = ops.gru_seq_bwd(dout, None, x, h0, w[0], w[1], out, ws, True, True, False, True)
        return (out, h_last, ws, *grads), fwd, ops.emu_counters()

    got, fwd, bwd = run()
    launches, grid = 2, 3  # (emu_counters: ..., launches, blocks, ...)
    if blocks:
        assert (fwd[launches], fwd[grid]) == (1, blocks) and (bwd[launches], bwd[grid]) == (1, blocks)
    else:
        assert fwd[launches] == seq and bwd[launches] == seq  # a gate launch per step
        monkeypatch.setenv("PYATTN_CUDA_GRU_BLOCKS", "0")
        for a, b in zip(got, run()[0]):
            assert torch.equal(a, b)


_GRU_LAYER_NAMES = ("out", "h_last", "ws", "dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh")
_GRU_PLAN_VARS = ("PYATTN_CUDA_GRU_BLOCKS", "PYATTN_CUDA_GRU_ONE_BLOCK", "PYATTN_CUDA_GRU_CLUSTER")


def _gru_layer_run(monkeypatch, data, reverse, carried, xs=None, **env):
    """gru_seq_fwd then gru_seq_bwd of data = (x, h0, dout, w_ih, w_hh, b_ih, b_hh) (x replaced by xs if given) with
    the GRU plan variables set as `env` says (the others unset): (the 9 outputs, the forward's emulator counters,
    the backward's)."""
    x, h0, dout, w_ih, w_hh, b_ih, b_hh = data
    xs = x if xs is None else xs
    for key in _GRU_PLAN_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ops = torch.ops.pyattn_emu
    ops.emu_reset_counters()
    fwd = ops.gru_seq_fwd(xs, h0, w_ih, w_hh, b_ih, b_hh, reverse, True)
    cf = ops.emu_counters()
    ops.emu_reset_counters()
    grads = ops.gru_seq_bwd(dout[:len(xs)], carried, xs, h0, w_ih, w_hh, fwd[0], fwd[2], b_ih is not None,
                            b_hh is not None, reverse, True)
    return (*fwd, *grads), cf, ops.emu_counters()


def _gru_layer_vs_oracle(got, data, reverse, carried, dtype):
    """_gru_layer_run's outputs against the torch backend in float64 on the same values (TOL["gru"])."""
    from pyattn.dispatch import get_backend

    x, h0, dout, w_ih, w_hh, b_ih, b_hh = data
    ref = get_backend("torch")
    args64 = [None if t is None else t.double() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    r_out, r_h, r_ws = ref.gru_layer_fwd(*args64, reverse, True)
    r_dh = torch.zeros_like(args64[1]) if carried is None else carried.double()
    r_grads = ref.gru_layer_bwd(dout.double(), r_dh, *args64[:4], r_out, r_ws, b_ih is not None, b_hh is not None,
                                reverse, True)
    for name, a, want in zip(_GRU_LAYER_NAMES, got, (r_out, r_h, r_ws, *r_grads)):
        if want is None or (isinstance(want, torch.Tensor) and want.numel() == 0 and a.numel() == 0):
            continue
        kind = "bwd" if name.startswith("d") else "fwd"
        wdtype = torch.float32 if name == "ws" and dtype == torch.float32 else dtype
        assert_tol(a, want, "gru", wdtype, kind=kind, msg=lambda msg, name=name: f"{name}: {msg}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seq,bsz,isz,hsz,bias", [(5, 3, 4, 37, True), (3, 1, 3, 128, True), (4, 2, 5, 9, False)],
                         ids=["padded", "h128", "nobias"])
def test_gru_one_block_kernels(order, monkeypatch, dtype, seq, bsz, isz, hsz, bias):
    """The one-block forward and backward (csrc/cuda/gru.cu gru_rec_fwd_one_kernel / gru_rec_bwd_one_kernel: W_hh
    and the recurrence's vectors in one block's shared memory, block barriers only): with PYATTN_CUDA_GRU_ONE_BLOCK=1
    the plans take both for T >= 2 and B H <= 512 (one launch each, one block, their shared memory), they match the
    float64 oracle forward and reverse, with and without a carried dh_last, and give the persistent kernels' bits
    (one block and a grid of 3; the same dot-product order); unset, the backward's is taken and the forward keeps the
    grid (its one-block kernel measured slower on an H200); =0 and one-step calls take the grid's plan."""
    monkeypatch.setenv("PYATTN_EMU_SMS", "4")
    x, h0, dout, dh_last, w_ih, w_hh, b_ih, b_hh = _gru_seq_data(seq * 7 + hsz, seq, bsz, isz, hsz, dtype)
    if not bias:
        b_ih = b_hh = None
    data = (x, h0, dout, w_ih, w_hh, b_ih, b_hh)
    ops = torch.ops.pyattn_emu
    launches, grid, smem = 2, 3, 4  # (emu_counters: ..., launches, blocks, largest dynamic shared memory, ...)
    hp, kp = (hsz + 3) // 4 * 4, (3 * hsz + 3) // 4 * 4
    fwd_smem = (3 * hsz * hp + 2 * bsz * hp + 2 * bsz * 3 * hsz + 6 * hsz) * 4
    bwd_smem = (hsz * kp + bsz * kp + hsz * bsz) * 4
    units = -(-hsz // 4)  # (the grid's plan: a block per emulated SM, H split evenly)
    names = _GRU_LAYER_NAMES

    def run(reverse, carried, **env):
        return _gru_layer_run(monkeypatch, data, reverse, carried, **env)

    for reverse, carried in ((False, None), (True, dh_last)):
        got, cf, cb = run(reverse, carried, PYATTN_CUDA_GRU_ONE_BLOCK="1")
        assert (cf[launches], cf[grid], cf[smem]) == (1, 1, fwd_smem), list(cf)
        assert (cb[grid], cb[smem]) == (1, bwd_smem), list(cb)  # (+ the binding's GEMM launches)
        _, cf, cb = run(reverse, carried)  # (the default: the grid's forward, the one-block backward)
        assert cf[grid] == -(-hsz // units) and cf[smem] != fwd_smem, list(cf)
        assert (cb[grid], cb[smem]) == (1, bwd_smem), list(cb)
        _gru_layer_vs_oracle(got, data, reverse, carried, dtype)
        for env in ({"PYATTN_CUDA_GRU_BLOCKS": "1"}, {"PYATTN_CUDA_GRU_BLOCKS": "3"}):
            other, cf, cb = run(reverse, carried, **env)
            assert cf[smem] != fwd_smem and cb[smem] != bwd_smem
            for name, a, b in zip(names, got, other):
                assert torch.equal(a, b), f"{name}: the one-block kernels and {env} differ"
        _, cf, cb = run(reverse, carried, PYATTN_CUDA_GRU_ONE_BLOCK="0")
        assert cf[grid] == cb[grid] == -(-hsz // units) and cf[smem] != fwd_smem, (list(cf), list(cb))
    monkeypatch.setenv("PYATTN_CUDA_GRU_ONE_BLOCK", "1")
    ops.emu_reset_counters()
    ops.gru_seq_fwd(x[:1], h0, w_ih, w_hh, b_ih, b_hh, False, True)
    assert ops.emu_counters()[grid] == -(-hsz // units)  # (one step: the W_hh load is not worth one block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seq,bsz,isz,hsz,bias", [(4, 1, 3, 128, True), (3, 3, 5, 61, False), (3, 2, 4, 70, True)],
                         ids=["h128", "padded-nobias", "uneven"])
def test_gru_cluster_kernels(order, monkeypatch, dtype, seq, bsz, isz, hsz, bias):
    """The cluster kernels (csrc/cuda/gru.cu gru_rec_fwd_one_kernel / gru_rec_bwd_one_kernel <T, 8>; the inference
    forward's default, else PYATTN_CUDA_GRU_CLUSTER=1): the one-block kernels split over a cluster of 8 blocks,
    each with its units' part of W_hh; forward, every new h value written into all 8 blocks' shared memory
    (distributed shared memory), backward, every dgh[t] entry (two buffers); a cluster barrier a step. The
    emulator runs the cluster as a cooperative launch of 8 blocks (block_smem, grid_sync), its blocks in every
    scheduling order: one launch each with the plan's shared memory, the one-block kernels' and the persistent
    grid's bits (the same dot-product order), forward and reverse, with and without a carried dh_last, within
    tolerance of the float64 oracle. Refused when a block would have no unit (H = 49: 7 ceil(49 / 8) = 49) and
    for one step (the cell kernel's); a refused cluster launch falls back to the grid."""
    monkeypatch.setenv("PYATTN_EMU_SMS", "4")
    x, h0, dout, dh_last, w_ih, w_hh, b_ih, b_hh = _gru_seq_data(seq * 3 + hsz, seq, bsz, isz, hsz, dtype)
    if not bias:
        b_ih = b_hh = None
    data = (x, h0, dout, w_ih, w_hh, b_ih, b_hh)
    ops = torch.ops.pyattn_emu
    launches, grid, smem = 2, 3, 4
    units, hp, kp = -(-hsz // 8), (hsz + 3) // 4 * 4, (3 * hsz + 3) // 4 * 4
    fwd_smem = (3 * units * hp + 2 * bsz * hp + 2 * bsz * 3 * units + 6 * units) * 4
    bwd_smem = (2 * bsz * kp + units * kp + units * bsz) * 4

    def run(reverse, carried, xs=None, **env):
        return _gru_layer_run(monkeypatch, data, reverse, carried, xs, **env)

    for reverse, carried in ((False, None), (True, dh_last)):
        got, cf, cb = run(reverse, carried, PYATTN_CUDA_GRU_CLUSTER="1")
        assert (cf[launches], cf[grid], cf[smem]) == (1, 8, fwd_smem), list(cf)
        assert (cb[grid], cb[smem]) == (8, bwd_smem), list(cb)  # (+ the binding's GEMM launches)
        one, cf, cb = run(reverse, carried, PYATTN_CUDA_GRU_ONE_BLOCK="1")
        assert cf[grid] == cb[grid] == 1, (list(cf), list(cb))
        persistent, cf, cb = run(reverse, carried, PYATTN_CUDA_GRU_ONE_BLOCK="0")
        assert cf[grid] == cb[grid] == 4, (list(cf), list(cb))
        for name, a, b, p in zip(_GRU_LAYER_NAMES, got, one, persistent):
            assert torch.equal(a, b) and torch.equal(a, p), f"{name}: the cluster, one-block and grid kernels differ"
        _gru_layer_vs_oracle(got, data, reverse, carried, dtype)
    # unset, the inference forward takes the cluster (=0: the grid; the same bits), a training step neither kernel
    train, cf, cb = run(False, None)
    assert cf[grid] != 8 and cb[grid] != 8, (list(cf), list(cb))
    for setting, blocks in ((None, 8), ("0", 4)):  # (run() left every plan variable unset)
        if setting is not None:
            monkeypatch.setenv("PYATTN_CUDA_GRU_CLUSTER", setting)
        ops.emu_reset_counters()
        inference = ops.gru_seq_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, False, False)
        assert ops.emu_counters()[grid] == blocks, (setting, list(ops.emu_counters()))
        assert all(torch.equal(a, b) for a, b in zip(inference[:2], train[:2])), setting
    _, cf, _ = run(False, None, xs=x[:1], PYATTN_CUDA_GRU_CLUSTER="1")
    assert cf[grid] != 8, list(cf)  # (one step)
    w49 = _gru_params(isz, 49, dtype, seed=1)
    ops.emu_reset_counters()
    ops.gru_seq_fwd(x, h0[:, :1].expand(bsz, 49).contiguous(), *w49, False, False)
    assert ops.emu_counters()[grid] != 8
    # a cluster launch the device refuses (the emulator: 8 cooperative blocks over PYATTN_EMU_COOP_LIMIT) falls back
    # to the plans without the cluster (the grid's 4 blocks): their bits, no error left behind
    monkeypatch.setenv("PYATTN_EMU_COOP_LIMIT", "4")
    fallback, cf, cb = run(False, None, PYATTN_CUDA_GRU_CLUSTER="1")
    assert cf[grid] == 4 and cb[grid] == 1, (list(cf), list(cb))  # (the backward's default: the one-block kernel)
    assert all(torch.equal(a, b) for a, b in zip(fallback, run(False, None, PYATTN_CUDA_GRU_ONE_BLOCK="0")[0]))
    monkeypatch.delenv("PYATTN_EMU_COOP_LIMIT")


def test_gru_persistent_launch_refused_falls_back_to_steps(monkeypatch):
    """A cooperative launch the device refuses at run time (fewer blocks fit at once than the occupancy query said,
    cudaErrorCooperativeLaunchTooLarge: PYATTN_EMU_COOP_LIMIT) runs the per-step path instead: its exact bits, no
    error, and nothing left for the next launch's cudaGetLastError."""
    g = torch.Generator().manual_seed(5)
    x, h0 = torch.randn(3, 4, 6, generator=g), torch.randn(4, 20, generator=g)
    w = _gru_params(6, 20, torch.float32, seed=5)
    dout, dh = torch.randn(3, 4, 20, generator=g), torch.randn(4, 20, generator=g)
    ops = torch.ops.pyattn_emu

    def both():
        out, h_last, ws = ops.gru_seq_fwd(x, h0, *w, False, True)
        return (out, h_last, ws, *ops.gru_seq_bwd(dout, dh, x, h0, w[0], w[1], out, ws, True, True, False, True))

    monkeypatch.setenv("PYATTN_CUDA_GRU_BLOCKS", "0")
    steps = both()
    monkeypatch.setenv("PYATTN_CUDA_GRU_BLOCKS", "3")
    monkeypatch.setenv("PYATTN_EMU_COOP_LIMIT", "2")
    for a, b in zip(both(), steps):
        assert torch.equal(a, b)
    monkeypatch.delenv("PYATTN_EMU_COOP_LIMIT")
    persistent = both()  # (3 blocks now fit: the persistent kernels, within rounding of the per-step path)
    for a, b in zip(persistent, steps):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)
    assert not all(torch.equal(a, b) for a, b in zip(persistent, steps))


@pytest.mark.parametrize("biases", ["none", "ih", "hh"])
def test_gru_persistent_kernels_without_biases(monkeypatch, biases):
    """The persistent kernels with a bias missing (None: its terms are 0; the forward loads each work item's input
    projection and biases ahead of its dot products) against the float64 oracle, forward and backward, with one
    block (work items after the first of each warp) and three."""
    from pyattn.dispatch import get_backend

    monkeypatch.setenv("PYATTN_EMU_SMS", "2")
    g = torch.Generator().manual_seed(11)
    x, h0 = torch.randn(3, 5, 4, generator=g), torch.rand(5, 13, generator=g) * 2 - 1
    dout = torch.randn(3, 5, 13, generator=g)
    w_ih, w_hh, b_ih, b_hh = _gru_params(4, 13, torch.float32, seed=11)
    b_ih, b_hh = (b_ih if biases == "ih" else None), (b_hh if biases == "hh" else None)
    ops, ref = torch.ops.pyattn_emu, get_backend("torch")
    args64 = [None if t is None else t.double() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    r_out, r_h, r_ws = ref.gru_layer_fwd(*args64, False, True)
    r_grads = ref.gru_layer_bwd(dout.double(), torch.zeros_like(args64[1]), *args64[:4], r_out, r_ws,
                                b_ih is not None, b_hh is not None, False, True)
    for blocks in ("1", "3"):
        monkeypatch.setenv("PYATTN_CUDA_GRU_BLOCKS", blocks)
        out, h_last, ws = ops.gru_seq_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, False, True)
        grads = ops.gru_seq_bwd(dout, None, x, h0, w_ih, w_hh, out, ws, b_ih is not None, b_hh is not None, False,
                                True)
        assert_tol(out, r_out, "gru", torch.float32)
        assert_tol(h_last, r_h, "gru", torch.float32)
        for got, want in zip(grads, r_grads):
            if want.numel() or got.numel():
                assert_tol(got, want, "gru", torch.float32, kind="bwd")


def test_gru_shared_memory_limit_follows_the_largest_plan(monkeypatch):
    """A kernel's dynamic shared-memory limit (cudaFuncSetAttribute, which csrc/cuda/launch.cuh's fit_kernel sets once
    per device and kernel) only ever rises: a plan with more shared memory after one with less, and the first again,
    all launch (the emulator refuses a launch above the limit set last). One block, so W_hh's part is all of it:
    H = 100, 80, 100 -> 120, 77, 120 KB."""
    monkeypatch.setenv("PYATTN_CUDA_GRU_BLOCKS", "1")
    ops = torch.ops.pyattn_emu
    for hsz in (100, 80, 100):
        g = torch.Generator().manual_seed(hsz)
        x, h0 = torch.randn(2, 1, 3, generator=g), torch.randn(1, hsz, generator=g)
        w = _gru_params(3, hsz, torch.float32, seed=hsz)
        ops.emu_reset_counters()
        out, _, _ = ops.gru_seq_fwd(x, h0, *w, False, False)
        assert ops.emu_counters()[4] > 48 * 1024 and torch.isfinite(out).all(), hsz


def test_gru_fewer_fuller_blocks_raise_the_limit(monkeypatch):
    """More blocks asked for than fit at once (PYATTN_CUDA_GRU_BLOCKS=6 on 2 emulated SMs that hold 2 blocks of
    82 KB each): the plan takes 4 fuller blocks of 122 KB and raises the kernel's shared-memory limit for them (a
    one-step forward: a plain launch, which needs no co-residency). Before, the limit stayed at the first size."""
    monkeypatch.setenv("PYATTN_EMU_SMS", "2")
    monkeypatch.setenv("PYATTN_CUDA_GRU_BLOCKS", "6")
    monkeypatch.setenv("PYATTN_CUDA_GRU_CELL", "0")  # (else the one-launch cell kernel takes the step)
    g = torch.Generator().manual_seed(200)
    x, h0 = torch.randn(1, 1, 3, generator=g), torch.randn(1, 200, generator=g)
    w = _gru_params(3, 200, torch.float32, seed=200)
    ops = torch.ops.pyattn_emu
    ops.emu_reset_counters()
    out, _, _ = ops.gru_seq_fwd(x, h0, *w, False, False)
    c = ops.emu_counters()
    assert (c[2], c[3]) == (1, 4) and c[4] > 120 * 1024, list(c)
    monkeypatch.setenv("PYATTN_CUDA_GRU_BLOCKS", "0")
    torch.testing.assert_close(out, ops.gru_seq_fwd(x, h0, *w, False, False)[0], atol=2e-5, rtol=2e-4)


def test_gru_one_step_is_a_plain_launch(monkeypatch):
    """A persistent forward of one step (a cell step, a layer with T = 1) has no grid barrier, so it is launched
    plainly, not cooperatively (csrc/cuda/gru.cu rec_launch: the cheaper launch on the host): with every cooperative
    launch refused (PYATTN_EMU_COOP_LIMIT=1) it still runs on the plan's blocks (a block per emulated SM) with W_hh in
    dynamic shared memory (the per-step gate kernel has none); a layer of two steps is refused and falls back."""
    from pyattn.dispatch import get_backend

    monkeypatch.setenv("PYATTN_EMU_SMS", "4")
    monkeypatch.setenv("PYATTN_CUDA_GRU_ONE_BLOCK", "0")  # (two steps would take the one-block kernel, a plain launch)
    monkeypatch.setenv("PYATTN_CUDA_GRU_CELL", "0")  # (one step of 3 rows would take the one-launch cell kernel)
    g = torch.Generator().manual_seed(9)
    x, h = torch.randn(2, 3, 6, generator=g), torch.randn(3, 20, generator=g)
    w = _gru_params(6, 20, torch.float32, seed=9)
    ops = torch.ops.pyattn_emu
    launches, grid, smem = 2, 3, 4  # (emu_counters: ..., launches, blocks, largest dynamic shared memory, ...)

    def counted(fn):
        ops.emu_reset_counters()
        out = fn()
        return out, ops.emu_counters()

    free, _ = counted(lambda: ops.gru_step_fwd(x[0], h, *w, True))
    monkeypatch.setenv("PYATTN_EMU_COOP_LIMIT", "1")
    step, c = counted(lambda: ops.gru_step_fwd(x[0], h, *w, True))
    assert (c[launches], c[grid]) == (1, 4) and c[smem] > 0, list(c)
    assert all(torch.equal(a, b) for a, b in zip(step, free))
    layer, c = counted(lambda: ops.gru_seq_fwd(x[:1], h, *w, False, True))
    assert (c[launches], c[grid]) == (1, 4) and c[smem] > 0, list(c)
    assert torch.equal(layer[0][0], step[0]) and torch.equal(layer[2][0], step[1])
    _, c = counted(lambda: ops.gru_seq_fwd(x, h, *w, False, True))
    assert c[launches] == 2 and c[smem] == 0, list(c)  # (refused: a gate launch per step)
    ref = get_backend("torch").gru_cell_fwd(x[0].double(), h.double(), *(t.double() for t in w), True)
    assert_tol(step[0], ref[0], "gru", torch.float32)


def test_gru_cell_step_and_nan_fill(order, monkeypatch):
    """gru_step_fwd / gru_step_bwd against the torch backend; NaN-filled outputs and scratch give the same bits."""
    from pyattn.dispatch import get_backend

    g = torch.Generator().manual_seed(3)
    x, h = torch.randn(6, 11, generator=g).half(), (torch.rand(6, 70, generator=g) * 2 - 1).half()
    w_ih, w_hh, b_ih, b_hh = _gru_params(11, 70, torch.float16)
    ops = torch.ops.pyattn_emu
    h1, ws = ops.gru_step_fwd(x, h, w_ih, w_hh, b_ih, b_hh, True)
    dh = torch.randn(6, 70, generator=g).half()
    grads = ops.gru_step_bwd(dh, x, h, w_ih, w_hh, ws, True, True, True)
    ref = get_backend("torch")
    args64 = [t.double() for t in (x, h, w_ih, w_hh, b_ih, b_hh)]
    r_h1, r_ws = ref.gru_cell_fwd(*args64, True)
    assert_tol(h1, r_h1, "gru", torch.float16)
    r_grads = ref.gru_cell_bwd(dh.double(), *args64[:4], r_ws, True, True, True)
    for got, want in zip(grads, r_grads):
        assert_tol(got, want, "gru", torch.float16, kind="bwd")
    monkeypatch.setenv("PYATTN_DEBUG_NAN_FILL", "1")
    again = ops.gru_step_fwd(x, h, w_ih, w_hh, b_ih, b_hh, True)
    assert torch.equal(again[0], h1) and torch.equal(again[1], ws)
    assert all(torch.equal(a, b) for a, b in zip(ops.gru_step_bwd(dh, x, h, w_ih, w_hh, ws, True, True, True), grads))


def _cell_inputs(bsz, isz, hsz, dtype, layout, seed):
    """x (bsz, isz), h (bsz, hsz) in [-1, 1) and the four parameters, laid out as `layout` says: "contiguous";
    "strided" (x and h rows padded to a multiple of 4 elements past their length, the weights row-padded views too);
    "offset" (every tensor starts one element into its storage: 4-element loads refused)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, isz, generator=g).to(dtype)
    h = (torch.rand(bsz, hsz, generator=g) * 2 - 1).to(dtype)
    params = _gru_params(isz, hsz, dtype, seed=seed)

    def lay(t):
        if layout == "strided" and t.dim() == 2:
            pad = torch.full((t.shape[0], t.shape[1] + 4), float("nan"), dtype=dtype)
            pad[:, :t.shape[1]] = t
            return pad[:, :t.shape[1]]
        if layout == "offset":
            buf = torch.full((t.numel() + 1,), float("nan"), dtype=dtype)
            buf[1:] = t.reshape(-1)
            return buf[1:].view(t.shape)
        return t

    return lay(x), lay(h), tuple(lay(t) for t in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bsz,isz,hsz,layout", [
    (1, 8, 20, "contiguous"),  # 4-element loads; one unit group per block
    (3, 5, 7, "contiguous"),   # odd sizes: 1-element loads
    (6, 12, 16, "strided"),    # padded rows (strides 16 and 20): 4-element loads, two items per unit
    (5, 16, 24, "offset"),     # misaligned pointers: 1-element loads
    (13, 3000, 16, "contiguous"),  # 12 KB a staged row: chunks of 8 rows, the second one partial
    (9, 0, 12, "contiguous"),  # input_size 0: gi = 0
])
def test_gru_cell_one_launch_kernel(order, monkeypatch, dtype, bsz, isz, hsz, layout):
    """The one-launch cell step (csrc/cuda/gru.cu gru_cell_fwd_kernel: x W_ih^T, h W_hh^T and the gates in one
    kernel, no GEMM) against the torch backend in float64, on 4 emulated SMs (blocks of several units): one launch
    with the plan's staged rows as its only shared memory, the same h' and workspace with and without biases and
    without the workspace, and gradients from its workspace through gru_step_bwd (PYATTN_CUDA_GRU_CELL=1: the
    13-row case is past the default limit of B (I + H))."""
    from pyattn.dispatch import get_backend

    monkeypatch.setenv("PYATTN_EMU_SMS", "4")
    monkeypatch.setenv("PYATTN_CUDA_GRU_CELL", "1")
    x, h, (w_ih, w_hh, b_ih, b_hh) = _cell_inputs(bsz, isz, hsz, dtype, layout, seed=bsz * 100 + hsz)
    ops = torch.ops.pyattn_emu
    ops.emu_reset_counters()
    h1, ws = ops.gru_step_fwd(x, h, w_ih, w_hh, b_ih, b_hh, True)
    c = ops.emu_counters()
    rows = min((bsz + 3) // 4 * 4, 96 * 1024 // ((isz + 3) // 4 * 4 + (hsz + 3) // 4 * 4) // 4 // 4 * 4)
    launches, grid, smem = 2, 3, 4
    assert (c[launches], c[grid]) == (1, -(-hsz // -(-hsz // 4))), list(c)
    assert c[smem] == rows * ((isz + 3) // 4 * 4 + (hsz + 3) // 4 * 4) * 4, (list(c), rows)
    ref = get_backend("torch")
    args64 = [t.double() for t in (x, h, w_ih, w_hh, b_ih, b_hh)]
    r_h1, r_ws = ref.gru_cell_fwd(*args64, True)
    assert_tol(h1, r_h1, "gru", dtype)
    assert_tol(ws, r_ws, "gru", torch.float32 if dtype == torch.float32 else dtype)
    h1_inf, ws_inf = ops.gru_step_fwd(x, h, w_ih, w_hh, b_ih, b_hh, False)
    assert torch.equal(h1_inf, h1) and ws_inf.numel() == 0
    nb = ops.gru_step_fwd(x, h, w_ih, w_hh, None, None, False)[0]
    assert_tol(nb, ref.gru_cell_fwd(*args64[:4], None, None, False)[0], "gru", dtype)
    dh = torch.randn(bsz, hsz, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = ops.gru_step_bwd(dh, x, h, w_ih, w_hh, ws, True, True, True)
    r_grads = ref.gru_cell_bwd(dh.double(), *args64[:4], r_ws, True, True, True)
    for got, want in zip(grads, r_grads):
        assert_tol(got, want, "gru", dtype, kind="bwd")


@pytest.mark.parametrize("dtype,limit", [(torch.float32, 32), (torch.bfloat16, 16)], ids=str)
def test_gru_cell_one_launch_work_limit(monkeypatch, dtype, limit):
    """The one-launch cell kernel takes steps with B (I + H) up to 32768 (fp32) / 16384 (16-bit) (gru_cell_fwd_plan,
    the H100's crossover with the sequence path): at I = H = 512, 32 / 16 rows; one row more goes the sequence path
    (the input projection as a GEMM, then the persistent kernel: W_hh in shared memory) unless PYATTN_CUDA_GRU_CELL=1,
    and PYATTN_CUDA_GRU_CELL=0 turns the kernel off. Every path gives h' within tolerance of the float64 oracle; an
    empty batch launches nothing."""
    from pyattn.dispatch import get_backend

    isz = hsz = 512
    x, h, w = _cell_inputs(limit + 1, isz, hsz, dtype, "contiguous", seed=4)
    ops = torch.ops.pyattn_emu
    row_bytes = (isz + hsz) * 4  # a staged row of x and h, fp32; at most 96 KB of them (24 rows here)

    def cell_smem(rows):
        return min((rows + 3) // 4 * 4, 96 * 1024 // row_bytes // 4 * 4) * row_bytes

    def smem_of(setting, rows=limit + 1):
        if setting is None:
            monkeypatch.delenv("PYATTN_CUDA_GRU_CELL", raising=False)
        else:
            monkeypatch.setenv("PYATTN_CUDA_GRU_CELL", setting)
        ops.emu_reset_counters()
        out = ops.gru_step_fwd(x[:rows], h[:rows], *w, False)[0]
        ref = get_backend("torch").gru_cell_fwd(*(t.double() for t in (x[:rows], h[:rows], *w)), False)[0]
        assert_tol(out, ref, "gru", dtype)
        return ops.emu_counters()[4]

    assert smem_of(None, limit) == cell_smem(limit)
    assert smem_of(None) != cell_smem(limit + 1)
    assert smem_of("1") == cell_smem(limit + 1)
    assert smem_of("0", limit) != cell_smem(limit)
    ops.emu_reset_counters()  # an empty batch: empty outputs, nothing launched
    h1, ws = ops.gru_step_fwd(x[:0], h[:0], *w, True)
    assert h1.shape == (0, hsz) and ws.shape == (0, 4 * hsz) and ops.emu_counters()[2] == 0


# ---- memcheck -----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(cuda_emu.libasan() is None, reason="the C++ compiler has no libasan.so (AddressSanitizer)")
def test_memcheck_every_op_under_address_sanitizer():
    """The emulator built with AddressSanitizer runs every CUDA op on small shapes with tight allocations (unaligned,
    NaN-padded, strided and broadcast inputs; dropout; every norm configuration; GRU): no access past any tensor,
    workspace or shared-memory buffer (the emulator's counterpart of compute-sanitizer memcheck)."""
    import subprocess

    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(cuda_emu.__file__), "cuda_emu.py"),
                        "--memcheck"], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert "memcheck clean" in r.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("hsz", [12, 13])
def test_gru_strided_and_unaligned_inputs(dtype, hsz):
    """Rows with odd strides and storage offsets, and odd hidden sizes, take the gate kernels' narrower vector
    variants (4 -> 2 -> 1 elements per thread): the same results as contiguous inputs."""
    seq, bsz, isz = 5, 3, 6
    g = torch.Generator().manual_seed(hsz)
    x = torch.randn(seq, bsz, isz, generator=g).to(dtype)
    h0 = torch.randn(bsz, hsz, generator=g).to(dtype)
    w_ih, w_hh, b_ih, b_hh = _gru_params(isz, hsz, dtype, seed=hsz)
    xbuf = torch.full((seq, bsz, isz + 3), float("nan"), dtype=dtype)
    xbuf[:, :, 1:1 + isz] = x
    hbuf = torch.full((bsz, hsz + 1), float("nan"), dtype=dtype)
    hbuf[:, 1:] = h0
    ops = torch.ops.pyattn_emu
    want = ops.gru_seq_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, False, True)
    got = ops.gru_seq_fwd(xbuf[:, :, 1:1 + isz], hbuf[:, 1:], w_ih, w_hh, b_ih, b_hh, False, True)
    # float16 goes through fp32 copies (the same GEMM inputs): bitwise equal; float32 GEMMs on strided operands may
    # sum in another order (as cuBLAS may on a GPU), so within fp32 rounding
    def same(a, b, atol, rtol):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
        else:
            assert torch.equal(a, b)

    for a, b in zip(got, want):
        same(a, b, 1e-6, 1e-5)
    dout = torch.randn(want[0].shape, generator=g).to(dtype)
    gw = ops.gru_seq_bwd(dout, want[1], x, h0, w_ih, w_hh, want[0], want[2], True, True, False, True)
    gg = ops.gru_seq_bwd(dout, want[1], xbuf[:, :, 1:1 + isz], hbuf[:, 1:], w_ih, w_hh, want[0], want[2], True, True,
                         False, True)
    for a, b in zip(gg, gw):
        same(a, b, 1e-5, 1e-4)
