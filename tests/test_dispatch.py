"""Backend selection: priority, overrides (argument > context > env > list), refusals with reasons, caching."""
import pytest
import torch

import pyattn
from pyattn.dispatch import BackendNotSupported, PRIORITY, get_backend, select
from pyattn.ops.layer_norm import make_inputs


def _inputs(n=16, dtype=torch.float32):
    return make_inputs(torch.randn(2, n, dtype=dtype), (n,))


def test_backends_listed_with_reasons():
    names = {name: (ok, why) for name, ok, why in pyattn.backends()}
    assert set(names) >= {"torch", "cpp", "triton", "cuda"}
    assert names["torch"] == (True, "")
    for ok, why in names.values():
        assert ok or why  # an unavailable backend always says why
    if not torch.cuda.is_available():
        assert not names["cuda"][0]


def test_priority_is_data_and_followed():
    assert PRIORITY[("layer_norm", "cpu")][-1] == "torch"
    chosen = select(_inputs())
    first_ok = next(n for n in PRIORITY[("layer_norm", "cpu")] if not get_backend(n).not_supported_reasons(_inputs()))
    assert chosen.name == first_ok


def test_float64_falls_back_to_torch():
    assert select(_inputs(dtype=torch.float64)).name == "torch"


def test_override_precedence(monkeypatch):
    x = _inputs()
    monkeypatch.setenv("PYATTN_BACKEND", "torch")
    assert select(x).name == "torch"
    with pyattn.use_backend("cpp"):
        assert select(x).name == "cpp"  # context beats env
        assert select(x, "torch").name == "torch"  # argument beats context
    monkeypatch.delenv("PYATTN_BACKEND")
    with pyattn.use_backend(None):
        assert select(x).name == PRIORITY[("layer_norm", "cpu")][0]


def test_forced_refusal_raises_with_reasons():
    x64 = _inputs(dtype=torch.float64)
    with pytest.raises(BackendNotSupported, match=r"backend 'cpp' \(forced by backend= argument\) cannot run "
                                                  r"layer_norm: dtype float64 not supported"):
        select(x64, "cpp")
    with pytest.raises(BackendNotSupported, match="cuda"):
        pyattn.layer_norm(torch.randn(2, 8), (8,), backend="cuda")
    with pytest.raises(ValueError, match="unknown pyattn backend 'nope'"):
        pyattn.layer_norm(torch.randn(2, 8), (8,), backend="nope")
    # the process stays usable after a refusal
    assert pyattn.layer_norm(torch.randn(2, 8), (8,)).shape == (2, 8)


def test_triton_refuses_huge_rows_and_cpu_without_interpreter(monkeypatch):
    tri = get_backend("triton")
    if not tri.availability()[0]:
        pytest.skip(f"triton unavailable: {tri.availability()[1]}")
    big = make_inputs(torch.empty(1, 65537), (65537,))
    assert any("65537 > 65536" in r for r in tri.not_supported_reasons(big))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert any("TRITON_INTERPRET=1" in r for r in tri.not_supported_reasons(_inputs()))


def test_explain_names_choice_and_refusals():
    text = pyattn.explain("layer_norm", torch.randn(2, 8, dtype=torch.float64), (8,))
    assert "selected: torch" in text and "cpp: refuses: dtype float64 not supported" in text
    assert "forced 'torch'" in pyattn.explain("layer_norm", torch.randn(2, 8), (8,), backend="torch")
    with pytest.raises(ValueError, match="unknown op"):
        pyattn.explain("conv", torch.randn(2))


def test_preferred_backend_moves_to_the_front(monkeypatch):
    """A backend later in an op's list that says it is the fastest for some inputs (Backend.preferred_for) is tried
    first for those and only those, and explain() shows the order used."""
    from pyattn.dispatch import registry

    torch_be = get_backend("torch")
    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(type(torch_be), "preferred_for", lambda self, inputs: inputs.dtype == torch.bfloat16)
    assert PRIORITY[("layer_norm", "cpu")][0] != "torch"
    assert select(_inputs(dtype=torch.bfloat16)).name == "torch"
    assert select(_inputs()).name == PRIORITY[("layer_norm", "cpu")][0]  # fp32: the list's own order
    assert "priority: torch > " in pyattn.explain("layer_norm", torch.randn(2, 16, dtype=torch.bfloat16), (16,))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backward,capability,hidden,expected", [
    (True, (9, 0), 64, True), (False, (9, 0), 64, True), (False, (9, 0), 8192, True), (False, (9, 0), 8193, False),
    (True, (9, 0), 8193, False), (True, (8, 0), 64, False), (False, (8, 0), 64, False), (True, (10, 0), 64, False)])
def test_cuda_backend_preferred_for_measured_norm(op, backward, capability, hidden, expected, monkeypatch):
    """Where the cuda backend's norm was measured faster than Triton's (cuda_norm_is_fastest): forward and backward
    on compute capability 9.0 (the H100's run) for rows of up to 8192 elements (the register kernels; longer rows
    take the looped ones, never timed against Triton's), nowhere else; the backward flag and the row length are in
    the signature selection is cached on (the two are selected apart)."""
    from pyattn.backends import cuda as cuda_be
    from pyattn.ops.layer_norm import NormInputs

    x = torch.empty(8, hidden, dtype=torch.bfloat16, device="meta")
    inputs = NormInputs(x, None, None, None, 1e-5, op == "rms_norm", backward=backward)
    assert inputs.op == op
    monkeypatch.setattr(cuda_be.torch.cuda, "get_device_capability", lambda device=None: capability)
    assert cuda_be.cuda_norm_is_fastest(inputs) is expected
    assert inputs.signature() != NormInputs(x, None, None, None, 1e-5, op == "rms_norm",
                                            backward=not backward).signature()


def test_norm_backward_is_selected_as_a_backward(monkeypatch):
    """The forward and the backward of a norm are selected apart, the backward's inputs saying so (what
    CudaBackend.preferred_for looks at)."""
    from pyattn.ops import layer_norm as ln_ops

    seen = []

    def recording_select(inputs, backend=None):
        seen.append(inputs.backward)
        return select(inputs, backend)

    monkeypatch.setattr(ln_ops, "select", recording_select)
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    pyattn.layer_norm(x, (16,), w).sum().backward()
    assert seen == [False, True] and x.grad is not None and w.grad is not None


@pytest.mark.parametrize("change,expected", [
    ({}, True), ({"needs_grad": True}, True), ({"d": 64, "dv": 64}, True),
    ({"d": 64, "dv": 64, "needs_grad": True}, True), ({"d": 96, "dv": 96, "needs_grad": True}, False),
    ({"dv": 64}, False), ({"lq": 127}, False), ({"d": 256, "dv": 256}, False),
    ({"dtype": torch.float32}, False), ({"mask": True}, False), ({"dropout_p": 0.1}, False), ({"scale": -1.0}, False),
    ({"capability": (8, 0)}, False), ({"capability": (10, 0)}, False), ({"sm90a": False}, False),
    # decoding steps (the split-KV kernel: no sm_90a code needed)
    ({"lq": 1}, True), ({"lq": 4, "hkv": 1}, True), ({"lq": 1, "sm90a": False}, True), ({"lq": 8, "hkv": 1}, False),
    ({"lq": 1, "lk": 255}, False), ({"lq": 1, "needs_grad": True}, False), ({"lq": 1, "d": 64, "dv": 64}, False),
    ({"lq": 1, "capability": (8, 0)}, False), ({"lq": 1, "mask": True}, False)])
def test_cuda_backend_preferred_for_measured_attention(change, expected, monkeypatch):
    """Where the cuda backend's attention was measured faster than Triton's on Hopper (cuda_attention_is_fastest):
    the warp-specialized forward and the Hopper backward at head dims 64 and 128 (at least one 128-row query tile, an
    sm_90a build), and decoding steps (<= 8 query rows per kv head over >= 256 keys) at head dim 128
    without autograd; every condition matters."""
    from pyattn.backends import cuda as cuda_be
    from pyattn.ops.attention import AttentionInputs

    c = {"needs_grad": False, "d": 128, "dv": 128, "lq": 128, "lk": 300, "hkv": 2, "dtype": torch.bfloat16,
         "mask": False, "dropout_p": 0.0, "scale": 0.1, "capability": (9, 0), "sm90a": True, **change}
    q = torch.empty(1, 2, c["lq"], c["d"], dtype=c["dtype"], device="meta")
    k = torch.empty(1, c["hkv"], c["lk"], c["d"], dtype=c["dtype"], device="meta")
    v = torch.empty(1, c["hkv"], c["lk"], c["dv"], dtype=c["dtype"], device="meta")
    mask = torch.empty(1, 1, c["lq"], c["lk"], dtype=torch.bool, device="meta") if c["mask"] else None
    inputs = AttentionInputs(q, k, v, mask, c["dropout_p"], True, False, c["scale"], c["needs_grad"])
    monkeypatch.setattr(cuda_be.torch.cuda, "get_device_capability", lambda device=None: c["capability"])
    monkeypatch.setattr(cuda_be, "build_info", lambda: {"sm90a_attention": c["sm90a"]})
    assert cuda_be.cuda_attention_is_fastest(inputs) is expected
    # what the preference depends on is in the signature selection is cached on: the query tile, decoding, the scale
    def sig(lq, lk, scale=0.1):
        q = torch.empty(1, 2, lq, 128, dtype=torch.bfloat16, device="meta")
        k = torch.empty(1, 2, lk, 128, dtype=torch.bfloat16, device="meta")
        return AttentionInputs(q, k, k, None, 0.0, True, False, scale, False).signature()

    assert sig(128, 300) != sig(127, 300) and sig(1, 300) != sig(1, 255) and sig(1, 300) != sig(1, 300, -0.1)
    assert sig(4, 300) == sig(1, 300) and sig(200, 300) == sig(128, 255)


def test_use_backend_around_the_forward_also_picks_the_backward(monkeypatch):
    # `with use_backend(name): loss = f(x)` then `loss.backward()` outside the block: the backward takes the backend
    # the block forced (it took the automatic choice, so a forced backend's backward kernels were never run).
    from pyattn.dispatch import get_backend
    seen = []
    tb = get_backend("torch")
    for meth in ("attention_bwd", "layer_norm_bwd", "gru_cell_bwd"):
        real = getattr(tb, meth)
        monkeypatch.setattr(tb, meth, lambda *a, _r=real, _m=meth: seen.append(_m) or _r(*a))
    x = torch.randn(1, 2, 5, 8, requires_grad=True)
    cell = pyattn.nn.GRUCell(8, 8)
    with pyattn.use_backend("torch"):
        loss = (pyattn.scaled_dot_product_attention(x, x, x).sum() + pyattn.layer_norm(x, (8,)).sum()
                + cell(x[0, 0]).sum())
    loss.backward()
    assert sorted(seen) == ["attention_bwd", "gru_cell_bwd", "layer_norm_bwd"]
