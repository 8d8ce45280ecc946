"""The kernel suites on a CUDA device (marked `gpu`: skipped, with the reason, on machines without one).

Each GPU backend (triton; cuda when built) against the float64 torch oracle with TESTING.md's rules: attention with
the 2x (forward) / 3x (backward) rule against a low-precision run, norms and GRU with pyattn.testing.TOL.
"""
import pytest
import torch

import pyattn
from pyattn.dispatch import get_backend
from pyattn.testing import assert_attention_close, assert_tol, attention_ref

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _gpu_backends(op):
    out = []
    for name in ("triton", "cuda"):
        b = get_backend(name)
        ok, why = b.availability()
        if op not in b.caps:
            continue
        out.append(pytest.param(name, marks=[] if ok else [pytest.mark.skip(reason=f"{name} unavailable: {why}")]))
    return out


@pytest.mark.parametrize("backend", _gpu_backends("attention"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lq,lk,d,causal,bottom_right,hkv", [
    (128, 128, 64, False, False, 4), (113, 203, 128, True, True, 2), (1000, 1000, 128, True, False, 1),
    (1, 239, 96, False, False, 4), (4096, 4096, 128, True, False, 4), (257, 129, 256, True, True, 2),
    (65, 65, 59, False, False, 4)])
def test_attention(backend, dtype, lq, lk, d, causal, bottom_right, hkv):
    g = torch.Generator(device=DEV).manual_seed(lq + lk + d)
    q = torch.randn(2, 4, lq, d, device=DEV, generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, hkv, lk, d, device=DEV, generator=g).to(dtype).requires_grad_()
    v = torch.randn(2, hkv, lk, d, device=DEV, generator=g).to(dtype).requires_grad_()
    dout = torch.randn(2, 4, lq, d, device=DEV, generator=g).to(dtype)
    fn = pyattn.flash_attn_func if bottom_right else pyattn.scaled_dot_product_attention
    if bottom_right:
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, backend=backend)
        out = out.transpose(1, 2)
    else:
        out = fn(q, k, v, is_causal=causal, enable_gqa=hkv != 4, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, _, ref_grads = attention_ref(q, k, v, causal=causal, bottom_right=bottom_right, dout=dout)
    low, _, low_grads = attention_ref(q, k, v, causal=causal, bottom_right=bottom_right, dout=dout, dtype=dtype)
    assert_attention_close(out, ref, low, factor=2)
    for name, got, want, lo in zip("qkv", grads, ref_grads, low_grads):
        assert_attention_close(got, want, lo, factor=3, name="d" + name)


@pytest.mark.parametrize("backend", _gpu_backends("layer_norm"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 127, 1024, 4096, 8192, 65536])
def test_layer_norm(backend, dtype, n):
    x = torch.randn(33, n, device=DEV).to(dtype).requires_grad_()
    r = torch.randn(33, n, device=DEV).to(dtype).requires_grad_()
    w = torch.randn(n, device=DEV, requires_grad=True)
    b = torch.randn(n, device=DEV, requires_grad=True)
    y, s = pyattn.layer_norm(x, (n,), w, b, residual=r, return_residual=True, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, r, w, b), dy)
    x64, r64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, r, w, b))
    y64 = pyattn.layer_norm(x64, (n,), w64, b64, residual=r64, backend="torch")
    ref_grads = torch.autograd.grad(y64, (x64, r64, w64, b64), dy.double())
    assert_tol(y, y64, "layer_norm", dtype)
    assert torch.equal(s, x.detach() + r.detach())
    for got, want in zip(grads, ref_grads):
        assert_tol(got, want, "layer_norm", dtype if got.shape == x.shape else torch.float32, kind="bwd")


@pytest.mark.parametrize("backend", _gpu_backends("gru"))
@pytest.mark.parametrize("bsz,hidden", [(1, 128), (33, 256), (64, 1024)])
def test_gru_module(backend, bsz, hidden):
    ours, theirs = pyattn.nn.GRU(64, hidden, num_layers=2, bidirectional=True).to(DEV), \
        torch.nn.GRU(64, hidden, num_layers=2, bidirectional=True).to(DEV).double()
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(17, bsz, 64, device=DEV)
    with pyattn.use_backend(backend):
        out, h = ours(x)
    ref_out, ref_h = theirs(x.double())
    assert_tol(out, ref_out, "gru", torch.float32)
    assert_tol(h, ref_h, "gru", torch.float32)
