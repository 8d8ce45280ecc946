"""pytest-benchmark entry points, for people who prefer that workflow over ``pyattn bench``.

    pytest benchmarks/test_bench_pytest.py --benchmark-group-by=group [--benchmark-json out.json]

They live in benchmarks/, not tests/, so the normal test run never times anything. The calls are the same as
``pyattn bench --op layernorm`` (benchmarks/bench_layernorm.py); that command remains the reference (it adds
same-run ceilings, percentiles, speedups and the PERF.md targets). Device: CUDA when available, else CPU.
"""
from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed "
                                               "(pip install pytest-benchmark, or pip install -e '.[bench]')")

import torch  # noqa: E402

import pyattn  # noqa: E402
from pyattn.benchmarks import bench_layernorm as bl  # noqa: E402
from pyattn.benchmarks.harness import Case, norm_bytes  # noqa: E402
from pyattn.dispatch import get_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M, N = 4096, 1024
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16")]


def _providers():
    out = [pytest.param("torch", id="torch-baseline")]
    for name, _, _ in pyattn.backends():
        out.append(pytest.param(name, id=f"pyattn-{name}"))
    return out


def _callable(op: str, mode: str, dtype: torch.dtype, provider: str):
    case = Case(op, mode, {"M": M, "N": N}, dtype, DEVICE, x="N")
    inputs = bl.make_inputs(case)
    if provider == "torch":
        return bl._factory(torch_ref=True)(case, inputs)
    if provider == "triton" and DEVICE == "cpu":
        pytest.skip("triton is not benchmarked on CPU (it only runs in the Triton interpreter there)")
    reasons = bl._refusals(provider, case, inputs)
    if reasons:
        pytest.skip(f"pyattn backend {provider} cannot run {op} here: " + "; ".join(reasons))
    get_backend(provider)
    return bl._factory(backend=provider)(case, inputs)


def _bench(benchmark, op, mode, dtype, provider):
    fn = _callable(op, mode, dtype, provider)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def timed():
        fn()
        sync()

    extra = 2 if op == "add_layer_norm" else 0
    benchmark.group = f"{op} {mode} {M}x{N} {str(dtype).replace('torch.', '')} {DEVICE}"
    benchmark.extra_info["bytes"] = norm_bytes(M * N, torch.empty((), dtype=dtype).element_size(), mode, extra)
    benchmark.pedantic(timed, warmup_rounds=3, rounds=30, iterations=1)


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_fwd(benchmark, dtype, provider):
    _bench(benchmark, "layer_norm", "fwd", dtype, provider)


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_bwd(benchmark, dtype, provider):
    _bench(benchmark, "layer_norm", "bwd", dtype, provider)


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm_fwd(benchmark, dtype, provider):
    _bench(benchmark, "add_layer_norm", "fwd", dtype, provider)


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_fwd(benchmark, dtype, provider):
    _bench(benchmark, "rms_norm", "fwd", dtype, provider)


# ---- transformer: the calls of `pyattn bench --op transformer` (benchmarks/bench_transformer.py), small size ------

def _transformer_callable(mode: str, provider: str):
    from pyattn.benchmarks import bench_transformer as bt

    shape = {k: v for k, v in bt.SMALL.items() if k != ("T" if mode == "generate" else "G")}
    case = Case("transformer", mode, shape, torch.float32, DEVICE)
    if provider == "baseline":  # torch.nn.Transformer, same weights; generation without a cache (torch has none)
        return bt._factory("torch", use_cache=False)(case, bt.make_inputs(case)), case
    if provider == "triton" and DEVICE == "cpu":
        pytest.skip("triton is not benchmarked on CPU (it only runs in the Triton interpreter there)")
    ok, why = get_backend(provider).availability()
    if not ok:
        pytest.skip(f"pyattn backend {provider} unavailable: {why}")
    reasons = bt._refusals(provider, case)
    if reasons:
        pytest.skip(f"pyattn backend {provider} cannot run the transformer here: " + "; ".join(reasons))
    return bt._factory("pyattn", provider)(case, bt.make_inputs(case)), case


def _bench_transformer(benchmark, mode: str, provider: str):
    from pyattn.benchmarks import bench_transformer as bt

    fn, case = _transformer_callable(mode, provider)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def timed():
        fn()
        sync()

    p = case.shape
    benchmark.group = f"transformer {mode} {case.shape_str} float32 {DEVICE}"
    benchmark.extra_info["flop"] = bt.work_for(case).amount
    benchmark.extra_info["tokens"] = p["B"] * (p["G"] if mode == "generate" else p["T"])
    benchmark.pedantic(timed, warmup_rounds=2, rounds=10, iterations=1)


def _transformer_providers():
    return [pytest.param("baseline", id="torch-nn.Transformer-baseline")] + [
        pytest.param(name, id=f"pyattn-{name}") for name, _, _ in pyattn.backends()]


@pytest.mark.parametrize("provider", _transformer_providers())
def test_transformer_train_step(benchmark, provider):
    _bench_transformer(benchmark, "fwd+bwd", provider)


@pytest.mark.parametrize("provider", _transformer_providers())
def test_transformer_generate_greedy(benchmark, provider):
    """pyattn: KV cache, one query row per step; the torch baseline decodes without a cache."""
    _bench_transformer(benchmark, "generate", provider)
