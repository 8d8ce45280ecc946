"""The benchmark harness works end to end at toy sizes on CPU: formulas, timing plumbing, output checks, table,
JSON/CSV schema, PNG plots, `pyattn bench` dispatch, and scripts/results_table.py. No timing is asserted."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import math
import os

import pytest
import torch

from pyattn import backends as pyattn_backends
from pyattn.benchmarks import harness, run
from pyattn.benchmarks.harness import (BenchContext, Case, Provider, Settings, Target, Work, apply_targets,
                                       attention_flops, compare, gru_flops, measure, norm_bytes, percentile)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What every result row must carry (PERF.md "Results" and the harness docstring).
ROW_FIELDS = {"op", "provider", "kind", "mode", "shape", "dtype", "device", "device_name", "torch", "triton", "pyattn",
              "commit", "p20_ms", "p50_ms", "p80_ms", "throughput", "throughput_unit", "pct_of_ceiling", "ceiling",
              "speedup", "peak_mem_mb", "check", "is_baseline", "x", "params"}


def _args(tmp_path, **kw):
    base = dict(op="layernorm", device="cpu", dtype="float32", quick=True, tiny=True, progress=False,
                json=str(tmp_path / "out" / "ln.json"), csv=str(tmp_path / "out" / "ln.csv"),
                plot=str(tmp_path / "plots"))
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny `pyattn bench --op layernorm` run shared by the schema tests (about a second)."""
    tmp = tmp_path_factory.mktemp("bench")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = run.main(_args(tmp))
    return rc, buf.getvalue(), tmp


# ---- formulas -------------------------------------------------------------------------------------------------

def test_work_formulas_follow_perf_md():
    f = 4 * 2 * 8 * 1024 * 512 * 64
    assert attention_flops(2, 8, 1024, 512, 64) == f
    assert attention_flops(2, 8, 1024, 1024, 64, causal=True) == 4 * 2 * 8 * 1024 * 1024 * 64 / 2
    assert attention_flops(2, 8, 1024, 512, 64, mode="bwd") == 2.5 * f
    assert attention_flops(2, 8, 1024, 512, 64, mode="fwd+bwd") == 3.5 * f
    assert norm_bytes(1000, 4) == 2 * 1000 * 4
    assert norm_bytes(1000, 2, extra=2) == 4 * 1000 * 2          # Add & Norm: + residual in + sum out
    assert norm_bytes(1000, 4, mode="bwd") == 3 * 1000 * 4
    assert gru_flops(32, 100, 256, 128) == 2 * 32 * 100 * 3 * 128 * (256 + 128)
    # two bidirectional layers: the second layer reads 2H = 64 inputs, the first I = 48
    assert gru_flops(1, 10, 48, 32, num_layers=2, bidirectional=True) == 2 * (2 * 10 * 96 * 80) + 2 * (2 * 10 * 96 * 96)
    assert Work(1.0, "bytes").ceiling == "PEAK_COPY" and Work(1.0, "flop").ceiling == "PEAK_GEMM"
    assert harness.throughput_unit("flop", "cuda") == ("TFLOP/s", 1e12)
    assert harness.throughput_unit("flop", "cpu") == ("GFLOP/s", 1e9)


def test_percentile_and_dtype_parsing():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 20) == pytest.approx(2.0)
    assert harness.parse_dtypes("fp32, bfloat16,bf16") == [torch.float32, torch.bfloat16]
    assert harness.parse_dtypes(None) is None
    with pytest.raises(ValueError, match="unknown dtype"):
        harness.parse_dtypes("float7")
    assert harness.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# ---- timing and ceilings ----------------------------------------------------------------------------------------

def test_measure_cpu_percentiles_ordered_and_no_cpu_peak_memory():
    calls = []
    t = measure(lambda: calls.append(torch.ones(16).sum()), "cpu", warmup=2, reps=7)
    assert t.reps == 7 and len(t.times) == 7 and len(calls) == 2 + 7
    assert 0 < t.p20 <= t.p50 <= t.p80
    assert t.peak_mem_bytes is None                     # documented: no CPU allocator statistics
    t2 = measure(lambda: None, "cpu", warmup=1, min_time=0.0, min_reps=3, max_reps=4)
    assert 3 <= t2.reps <= 4


def test_measure_gpu_queues_a_busy_wait_longer_than_the_host_time(monkeypatch):
    """On GPU every timed call is queued behind torch.cuda._sleep for 1.5x the host's issue time + 20 us (so the
    events time the device, not the Python and launch overhead), the sleep's rate calibrated once from timed
    sleeps; Timing.host is the fastest warm-up call's issue time. CUDA is faked here: events, sleeps and the
    clock are bookkeeping (1 cycle = 1 ns), and fn() takes 2 ms of host time."""
    clock = {"t": 0.0}
    sleeps = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock["t"]

        def synchronize(self):
            pass

        def elapsed_time(self, other):  # ms
            return (other.t - self.t) * 1e3

    def fake_sleep(cycles):
        sleeps.append(cycles)
        clock["t"] += cycles * 1e-9  # (a 1 GHz spin loop, run where it is queued)

    def fn():
        clock["t"] += 2e-3

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "_sleep", fake_sleep, raising=False)
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock["t"])
    harness._gpu_cycles_per_second.cache_clear()
    try:
        t = measure(fn, "cuda", warmup=2, reps=4, flush_l2=False, memory=False)
        assert sleeps[:3] == [2_000_000] * 3  # the calibration
        assert harness._gpu_cycles_per_second() == pytest.approx(1e9)
    finally:
        harness._gpu_cycles_per_second.cache_clear()
    assert t.host == pytest.approx(2e-3) and t.reps == 4
    assert sleeps[3:] == [pytest.approx(1e9 * (1.5 * 2e-3 + 20e-6), abs=1)] * 4
    assert t.p50 == pytest.approx(2e-3)  # (the fake's events time fn alone)


def test_ceilings_measure_something_at_tiny_size():
    c = harness.peak_copy("cpu", nbytes=1 << 20, timing={"warmup": 1, "reps": 3})
    g = harness.peak_gemm("cpu", 64, timing={"warmup": 1, "reps": 3})
    assert c.name == "PEAK_COPY" and c.unit == "bytes" and c.value > 0 and math.isfinite(c.value)
    assert g.name == "PEAK_GEMM" and g.unit == "flop" and g.value > 0
    assert c.as_dict("cpu")["unit"] == "GB/s" and g.as_dict("cpu")["unit"] == "GFLOP/s"


def test_compare_flags_wrong_values_shapes_and_nan_patterns():
    a = torch.randn(8, 8)
    assert compare(a, a.clone(), torch.float32) == (True, 0.0)
    ok, err = compare(a, a + 1.0, torch.float32)
    assert not ok and err == pytest.approx(1.0)
    b = a.clone()
    b[0, 0] = float("nan")
    assert not compare(a, b, torch.float32)[0]
    assert compare(a, a[:4], torch.float32) == (False, None)
    assert compare((a, a), [a], torch.float32) == (False, None)


# ---- run_cases: checks, failures, speedups ------------------------------------------------------------------------

def test_run_cases_flags_wrong_provider_and_survives_a_broken_one():
    ctx = BenchContext("cpu", tiny=True, progress=False)
    case = Case("toy", "fwd", {"N": 32}, torch.float32, "cpu", x="N")

    def make(case):
        return {"x": torch.randn(case.shape["N"], dtype=case.dtype)}

    def boom(case, inputs):
        raise RuntimeError("kernel exploded\nsecond line")

    provs = [Provider("right", lambda c, i: (lambda: i["x"] * 2), "pyattn:right"),
             Provider("wrong", lambda c, i: (lambda: i["x"] * 2 + 1), "pyattn:wrong"),
             Provider("broken", boom, "pyattn:broken"),
             Provider("base", lambda c, i: (lambda: i["x"] + i["x"]), "torch:base", baseline=True)]
    rows = ctx.run_cases([case], make, lambda c: provs, lambda c: Work(8.0 * c.shape["N"], "bytes"))
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"base", "right", "wrong"}
    assert by["base"]["is_baseline"] and by["base"]["speedup"] == pytest.approx(1.0)
    assert by["right"]["check"] == "ok" and by["wrong"]["check"] == "MISMATCH"
    assert all(r["baseline"] == "base" and r["speedup"] > 0 for r in rows)
    assert any("broken FAILED" in n and "kernel exploded" in n and "second line" not in n for n in ctx.notes)
    assert "PEAK_COPY" in ctx.ceilings and by["right"]["pct_of_ceiling"] > 0


def test_run_cases_times_providers_in_interleaved_rounds():
    """Settings.rounds > 1 (the GPU default): each provider is checked and timed once, then timed again round by
    round, one provider after another; its times are pooled (reps add up), and one that fails in a later round keeps
    its first round's times with a note."""
    settings = dataclasses.replace(Settings.for_run("cpu", tiny=True), rounds=3)
    ctx = BenchContext("cpu", tiny=True, progress=False, settings=settings)
    case = Case("toy", "fwd", {"N": 32}, torch.float32, "cpu", x="N")
    order, calls = [], {"flaky": 0}

    def prov(name, baseline=False):
        def factory(c, inputs):
            def fn():
                order.append(name)
                if name == "flaky":
                    calls["flaky"] += 1
                    if calls["flaky"] > 5:  # (check call + first round's warm-up and reps)
                        raise RuntimeError("gone")
                return inputs["x"] * 2
            return fn
        return Provider(name, factory, ("torch:" if baseline else "pyattn:") + name, baseline=baseline)

    rows = ctx.run_cases([case], lambda c: {"x": torch.ones(32)}, lambda c: [prov("a"), prov("base", True),
                                                                            prov("flaky")],
                         lambda c: Work(8.0 * c.shape["N"], "bytes"))
    by = {r["provider"]: r for r in rows}
    reps = settings.min_reps
    assert by["a"]["reps"] == by["base"]["reps"] == 3 * reps and by["flaky"]["reps"] == reps
    assert any("flaky FAILED in a later timing round" in n for n in ctx.notes)
    runs = [name for i, name in enumerate(order) if i == 0 or order[i - 1] != name]  # consecutive calls merged
    assert runs == ["base", "a", "flaky"] * 3  # (the baseline first; flaky's later rounds fail at their warm-up)


def test_targets_mark_best_pyattn_provider():
    def row(provider, kind, speedup, check="ok"):
        return {"op": "layer_norm", "mode": "fwd", "device": "cpu", "dtype": "float32", "params": {"M": 4, "N": 8},
                "shape": "M=4 N=8", "provider": provider, "kind": kind, "speedup": speedup, "pct_of_ceiling": 50.0,
                "ceiling": "PEAK_COPY", "check": check, "target": None, "meets_target": None}

    rows = [row("torch:F.layer_norm", "torch:F.layer_norm", 1.0), row("pyattn:cpp", "pyattn:cpp", 2.5),
            row("pyattn:bad", "pyattn:bad", 9.0, check="MISMATCH")]
    lines = apply_targets(rows, [Target("layer_norm", "fwd", "cpu", lambda p: p["N"] == 8, min_speedup=2.0)])
    assert rows[0]["target"] is None
    assert rows[1]["meets_target"] is True and rows[2]["meets_target"] is False   # wrong output never meets
    assert len(lines) == 1 and lines[0].strip().startswith("MISS")              # best by speedup is the bad one
    rows[2]["speedup"] = 0.5
    lines = apply_targets(rows, [Target("layer_norm", "fwd", "cpu", lambda p: True, min_speedup=2.0)])
    assert lines[0].strip().startswith("MET") and "pyattn:cpp" in lines[0]


def test_targets_against_the_fastest_torch_provider():
    """min_vs_fastest compares with the fastest torch row of the case (PERF.md: each SDPA backend forced), not with
    the baseline; kinds splits it per kernel family; several targets on one row are joined and met only together."""
    def row(provider, p50, speedup):
        return {"op": "attention", "mode": "fwd", "device": "cuda", "dtype": "bfloat16", "params": {"L": 4096},
                "shape": "L=4096", "provider": provider, "kind": provider, "p50_ms": p50, "speedup": speedup,
                "pct_of_ceiling": None, "ceiling": None, "check": "ok", "target": None, "meets_target": None}

    rows = [row("torch:flash", 1.6, 1.0), row("torch:cudnn", 0.9, 1.78), row("pyattn:cuda", 0.95, 1.68),
            row("pyattn:triton", 1.0, 1.6)]
    lines = apply_targets(rows, [
        Target("attention", "fwd", "cuda", lambda p: True, min_speedup=1.6),
        Target("attention", "fwd", "cuda", lambda p: True, min_vs_fastest=1.0, kinds=("pyattn:cuda",)),
        Target("attention", "fwd", "cuda", lambda p: True, min_vs_fastest=0.85, kinds=("pyattn:triton",))])
    assert [line.split()[0] for line in lines] == ["MET", "MISS", "MET"]
    assert "0.95x torch:cudnn" in lines[1] and "0.90x torch:cudnn" in lines[2]
    cuda, triton = rows[2], rows[3]
    assert cuda["target"] == ">= 1.6x; >= 1x fastest torch" and cuda["meets_target"] is False
    assert triton["target"] == ">= 1.6x; >= 0.85x fastest torch" and triton["meets_target"] is True
    assert rows[0]["target"] is None and rows[1]["target"] is None


# ---- pyattn bench --op layernorm, tiny ---------------------------------------------------------------------------

def test_bench_layernorm_tiny_prints_table(tiny_run):
    rc, out, _ = tiny_run
    assert rc == 0
    header = next(line for line in out.splitlines() if line.startswith("op "))
    for col in ("provider", "p50 ms", "throughput", "% ceil", "speedup", "check"):
        assert col in header
    assert "ceiling PEAK_COPY" in out
    for prov in ("torch:F.layer_norm", "torch:F.rms_norm", "torch:x+r,F.layer_norm", "pyattn:torch"):
        assert prov in out
    assert "GB/s" in out and "base" in out


def test_table_shows_the_host_time_of_gpu_rows(tiny_run):
    """Rows with ``host_ms`` (GPU: the host's issue time, the timed columns being the device's) get a ``host ms``
    column, right after the spread; CPU rows (None) none."""
    _, _, tmp = tiny_run
    rows = json.loads((tmp / "out" / "ln.json").read_text())["rows"]
    assert all(r["host_ms"] is None for r in rows) and "host ms" not in harness.format_table(rows)
    table = harness.format_table([{**r, "host_ms": 0.0125} for r in rows])
    header = next(line for line in table.splitlines() if line.startswith("op "))
    assert header.index("[p20 - p80]") < header.index("host ms") < header.index("throughput")
    assert " 0.013 " in table or " 0.012 " in table


def test_bench_layernorm_tiny_json_schema(tiny_run):
    _, _, tmp = tiny_run
    doc = json.loads((tmp / "out" / "ln.json").read_text())
    assert doc["schema"] == 1 and set(doc) >= {"env", "ceilings", "notes", "targets", "rows"}
    assert doc["env"]["device"] == "cpu" and doc["env"]["torch"] == torch.__version__
    assert "PEAK_COPY" in doc["ceilings"] and doc["ceilings"]["PEAK_COPY"]["value"] > 0
    peak = doc["ceilings"]["PEAK_COPY"]["value"]          # the final (best of two) ceiling is the one rows use
    assert all(r["ceiling_value"] == pytest.approx(peak) for r in doc["rows"])
    assert all(r["pct_of_ceiling"] == pytest.approx(100 * r["throughput"] / peak) for r in doc["rows"])
    rows = doc["rows"]
    # 5 (op, mode) x 2 sizes x 1 dtype, each with a baseline and at least the torch backend
    cases = {(r["op"], r["mode"], r["shape"]) for r in rows}
    assert {(op, mode) for op, mode, _ in cases} == {("layer_norm", "fwd"), ("layer_norm", "bwd"), ("rms_norm", "fwd"),
                                                     ("rms_norm", "bwd"), ("add_layer_norm", "fwd")}
    assert len(cases) == 10
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["peak_mem_mb"] is None
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["throughput"] > 0 and r["pct_of_ceiling"] > 0
        assert r["check"] == "ok", r                     # every provider agrees with the float64 reference
        assert r["kind"].startswith(("pyattn:", "torch:"))
        assert r["kind"] != "pyattn:triton"              # never on CPU (conftest sets TRITON_INTERPRET=1 here)
    for case in cases:
        rs = [r for r in rows if (r["op"], r["mode"], r["shape"]) == case]
        assert sum(r["is_baseline"] for r in rs) == 1
        assert any(r["provider"] == "pyattn:torch" for r in rs)
        assert next(r for r in rs if r["is_baseline"])["speedup"] == pytest.approx(1.0)
    assert any("triton" in n for n in doc["notes"])


def test_bench_layernorm_tiny_csv_and_plots(tiny_run):
    _, _, tmp = tiny_run
    with open(tmp / "out" / "ln.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == harness.CSV_FIELDS
        rows = list(reader)
    n_json = len(json.loads((tmp / "out" / "ln.json").read_text())["rows"])
    assert len(rows) == n_json and all(float(r["p50_ms"]) > 0 for r in rows)
    assert json.loads(rows[0]["params"])["M"] == 64
    pngs = sorted(p.name for p in (tmp / "plots").iterdir())
    assert pngs == sorted(f"{op}_{mode}_float32_cpu.png" for op, mode in
                          [("layer_norm", "fwd"), ("layer_norm", "bwd"), ("rms_norm", "fwd"), ("rms_norm", "bwd"),
                           ("add_layer_norm", "fwd")])
    for name in pngs:
        assert (tmp / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- dispatch of --op -----------------------------------------------------------------------------------------------

def test_ops_without_bench_file_are_reported_or_skipped(monkeypatch, tmp_path, capsys):
    real = run.bench_file
    monkeypatch.setattr(run, "bench_file", lambda op: real(op) if op == "layernorm" else str(tmp_path / "missing.py"))
    assert run.main(argparse.Namespace(op="attention", device="cpu")) == 0
    assert "attention: not benchmarked yet (no bench_attention.py)" in capsys.readouterr().out
    from pyattn.cli import main as cli_main

    assert cli_main(["bench", "--op", "gru,transformer", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "gru: not benchmarked yet (no bench_gru.py)" in out and "no bench_transformer.py" in out
    # 'all' skips them silently and still runs layernorm
    assert run.main(_args(tmp_path, op="all", json=None, csv=None, plot=None)) == 0
    out = capsys.readouterr().out
    assert "not benchmarked yet" not in out and "layer_norm" in out


def test_bad_arguments_return_2(capsys):
    assert run.main(argparse.Namespace(op="convolution")) == 2
    assert run.main(argparse.Namespace(op="layernorm", dtype="float7")) == 2
    assert run.main(argparse.Namespace(op="layernorm", device="tpu")) == 2
    err = capsys.readouterr().err
    assert "unknown --op" in err and "unknown dtype" in err


# ---- scripts/results_table.py ----------------------------------------------------------------------------------------

def _results_table():
    spec = importlib.util.spec_from_file_location("results_table", os.path.join(ROOT, "scripts", "results_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_table_rewrites_readme_block(tiny_run, tmp_path, capsys):
    _, _, tmp = tiny_run
    rt = _results_table()
    results = tmp_path / "results"
    (results / "toy-device").mkdir(parents=True)
    (results / "toy-device" / "bench.json").write_text((tmp / "out" / "ln.json").read_text())
    (results / "toy-device" / "other.json").write_text('{"not": "bench output"}')
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- results:begin -->\nold hand-written numbers\n<!-- results:end -->\nafter\n")
    assert rt.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old hand-written numbers" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    block = text.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]
    assert "| layer_norm | fwd | float32 | M=64 N=32 | torch:F.layer_norm |" in block
    assert "toy-device" in block and "PEAK_COPY" in block
    assert rt.main(["--results", str(results), "--readme", str(readme)]) == 0
    assert readme.read_text() == text                    # idempotent
    assert rt.main(["--results", str(results), "--all"]) == 0
    assert "pyattn:torch" in capsys.readouterr().out
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("nothing here\n")
    assert rt.main(["--results", str(results), "--readme", str(no_markers)]) == 1
    assert no_markers.read_text() == "nothing here\n"
    assert "No benchmark results" in rt.render(rt.load(str(tmp_path / "empty")))


def test_every_accepting_backend_is_benchmarked_and_refusals_are_noted(monkeypatch, tmp_path, capsys):
    """A backend that takes float32 only (standing in for a C++ kernel that lands later): it gets rows in float32,
    and a one-line note with its reason in bfloat16."""
    from pyattn.dispatch import Backend, get_backend, registry
    from pyattn.dispatch.backend import OpCaps

    class FakeBackend(Backend):
        name = "fakecpp"
        caps = {op: OpCaps(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))
                for op in ("layer_norm", "rms_norm")}

        def layer_norm_fwd(self, *args):
            return get_backend("torch").layer_norm_fwd(*args)

        def layer_norm_bwd(self, *args):
            return get_backend("torch").layer_norm_bwd(*args)

    monkeypatch.setitem(registry._BACKENDS, "fakecpp", FakeBackend())
    registry._cache.clear()
    try:
        out_json = tmp_path / "fake.json"
        assert run.main(_args(tmp_path, dtype="float32,bfloat16", json=str(out_json), csv=None, plot=None)) == 0
    finally:
        registry._cache.clear()
    doc = json.loads(out_json.read_text())
    fake = [r for r in doc["rows"] if r["provider"] == "pyattn:fakecpp"]
    assert len(fake) == 10 and {r["dtype"] for r in fake} == {"float32"}
    assert all(r["check"] == "ok" and r["speedup"] > 0 for r in fake)
    assert any("pyattn:fakecpp not benchmarked for layer_norm on cpu: dtype bfloat16 not supported" in n
               for n in doc["notes"])
    assert "pyattn:fakecpp" in capsys.readouterr().out


# ---- pyattn bench --op transformer, tiny ----------------------------------------------------------------------------

def test_transformer_flop_formulas_match_torch_flop_counter():
    """The matmul part of transformer_flops / generate_flops equals what torch.utils.flop_counter counts on the real
    model (it does not count attention, which is added by hand here: 4*Lq*Lk*E per layer and batch, causal halved)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pyattn.benchmarks import bench_transformer as bt

    p = dict(bt.TINY)
    B, S, T, G, E, F_, N, V = (p[k] for k in "BSTGEFNV")
    train = Case("transformer", "fwd+bwd", {k: v for k, v in p.items() if k != "G"}, torch.float32, "cpu")
    inputs = bt.make_inputs(train)
    m = bt._model(train, inputs, "torch").train()
    with FlopCounterMode(display=False) as fc:
        m(inputs["src"], inputs["tgt_in"]).sum().backward()
    attn = N * B * (4 * S * S * E + 2 * T * T * E + 4 * T * S * E)
    assert fc.get_total_flops() == bt.transformer_flops(B, S, T, E, F_, N, V, "fwd+bwd") - 3 * attn
    assert bt.work_for(train).amount == bt.transformer_flops(B, S, T, E, F_, N, V, "fwd+bwd")
    gen = Case("transformer", "generate", {k: v for k, v in p.items() if k != "T"}, torch.float32, "cpu")
    inputs = bt.make_inputs(gen)
    m = bt._model(gen, inputs, "pyattn")
    with FlopCounterMode(display=False) as fc:
        out = m.generate(inputs["src"], G, min_new_tokens=G)
    assert out.shape == (B, G)
    attn = N * B * (4 * S * S * E + 4 * S * E * G + 4 * E * sum(t + 1 for t in range(G)))
    assert fc.get_total_flops() == bt.generate_flops(B, S, G, E, F_, N, V) - attn


def test_bench_transformer_tiny(tmp_path, capsys):
    out_json = tmp_path / "tr.json"
    assert run.main(_args(tmp_path, op="transformer", json=str(out_json), csv=None,
                          plot=str(tmp_path / "trplots"))) == 0
    out = capsys.readouterr().out
    doc = json.loads(out_json.read_text())
    rows = doc["rows"]
    assert {(r["op"], r["mode"]) for r in rows} == {("transformer", "fwd+bwd"), ("transformer", "generate")}
    # the backends that take CPU tensors (the bench runs on the CPU here; cuda and triton take GPU tensors)
    available = {name for name, ok, _ in pyattn_backends() if ok and name not in ("triton", "cuda")}
    assert {"cpp", "torch"} <= available
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["check"] == "ok", r                    # losses and grads vs float64; tokens vs the baseline's
        assert r["tokens_per_s"] > 0 and r["speedup"] > 0 and r["throughput"] > 0
        assert r["kind"] != "pyattn:triton"
    train = {r["provider"] for r in rows if r["mode"] == "fwd+bwd"}
    gen = {r["provider"] for r in rows if r["mode"] == "generate"}
    assert train == {"torch:nn.Transformer"} | {f"pyattn:{n}" for n in available}
    # the baseline says it has no cache; the default (first-priority) backend also runs without one
    assert gen == ({"torch:nn.Transformer, no KV cache (torch has none)", "pyattn:cpp no cache"}
                   | {f"pyattn:{n} KV cache" for n in available})
    assert sum(r["is_baseline"] for r in rows) == 2
    assert any("generated tokens/s" in n for n in doc["notes"])
    assert any("pyattn:triton not benchmarked on CPU" in n for n in doc["notes"])
    assert "no KV cache (torch has none)" in out and "pyattn:cpp KV cache" in out
    pngs = sorted(p.name for p in (tmp_path / "trplots").iterdir())
    assert pngs == ["transformer_fwd-bwd_float32_cpu.png", "transformer_generate_float32_cpu.png"]


def test_bench_transformer_catches_a_wrong_model(monkeypatch, tmp_path):
    """A pyattn model that computes something else (a decoder layer's weights perturbed after loading) is flagged
    MISMATCH in the training-step rows, not given a speedup quietly."""
    from pyattn.benchmarks import bench_transformer as bt

    real = bt._model

    def broken(case, inputs, core):
        m = real(case, inputs, core)
        if core == "pyattn":
            with torch.no_grad():
                m.transformer.decoder.layers[0].linear1.weight.mul_(1.5)
        return m

    monkeypatch.setattr(bt, "_model", broken)
    out_json = tmp_path / "bad.json"
    assert run.main(_args(tmp_path, op="transformer", json=str(out_json), csv=None, plot=None)) == 0
    rows = json.loads(out_json.read_text())["rows"]
    ours = [r for r in rows if r["mode"] == "fwd+bwd" and not r["is_baseline"]]
    assert ours and all(r["check"] == "MISMATCH" for r in ours)


def test_attention_decode_rows_tiny():
    """`pyattn bench --op decode` rows (one query row against a KV cache, GQA): every provider checked against the
    float64 baseline, GB/s against PEAK_COPY, pyattn:cpp among them."""
    from pyattn.benchmarks import bench_decode as ba

    ctx = BenchContext("cpu", tiny=True, progress=False)
    cases = ba.decode_cases(ctx)
    assert cases and all(c.op == ba.DECODE_OP and c.shape["Lq"] == 1 and c.shape["H"] > c.shape["Hkv"]
                         for c in cases)
    rows = ctx.run_cases(cases, ba.make_decode_inputs, ba.decode_providers(ctx), ba.decode_work)
    by = {(r["dtype"], r["provider"]): r for r in rows}
    for dt in ("float32", "bfloat16"):
        assert by[(dt, "torch:sdpa-flash")]["is_baseline"]
        cpp = by[(dt, "pyattn:cpp")]
        assert cpp["check"] == "ok" and cpp["ceiling"] == "PEAK_COPY" and cpp["speedup"] > 0
