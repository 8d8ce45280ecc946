"""CPU peak-memory rows of the benchmark harness (``metric`` "memory"; ``pyattn bench --op attention`` on CPU):
the resident-set measurement, the fresh-process probe and its failure notes, and the attention memory rows at a size
where O(L^2) and O(L) must differ (L = 2048: an L x L fp32 matrix is 16 MiB, q/k/v/out 0.5 MiB each). Each probe is
a fresh Python process (about 2-3 s here), so the tests stay at a handful of them. No timing is asserted."""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import sys
import time

import pytest
import torch

from pyattn.benchmarks import bench_attention as ba
from pyattn.benchmarks import harness, run
from pyattn.benchmarks.harness import BenchContext, Case, MiB, Provider, ProbeFailed, Target, apply_targets

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")

MEM_L = 2048


# ---- probes for the failure paths (module level: the child process imports this module) --------------------------

def _probe_raises(**_):
    raise RuntimeError("probe exploded\nsecond line")


def _probe_killed(**_):
    os.kill(os.getpid(), signal.SIGKILL)


def _probe_sleeps(**_):
    time.sleep(60)


def _probe_ok(n: int):
    return {"n": n, "threads": torch.get_num_threads()}


def _probe_without_clear_refs():
    """cpu_peak_rss where /proc/self/clear_refs is refused: the ru_maxrss fallback, on an allocation 512 MiB larger
    than how far ru_maxrss, which cannot be reset, stands above the resident set now. (It is not this process's own
    peak: Linux carries ru_maxrss across execve, so a probe started by a test worker that had grown to 1.1 GB began
    there, and a fixed 512 MiB allocation did not raise it.)"""
    import resource

    harness._reset_peak_rss = lambda: False
    above = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - harness._status_kb("VmRSS")) * 1024
    rows = (above + 512 * MiB) // (8192 * 4)
    res = harness.cpu_peak_rss(lambda: torch.ones(rows, 8192))
    return {**res, "allocated": rows * 8192 * 4}


def _probe_peaks():
    """cpu_peak_rss of a 64 MiB and a 64-byte allocation in a fresh process (in a long-lived one, e.g. a test worker,
    a call can reuse memory freed earlier and still resident: a 64 MiB tensor once measured 0 bytes there)."""
    return {"big": harness.cpu_peak_rss(lambda: torch.ones(2048, 8192)),
            "small": harness.cpu_peak_rss(lambda: torch.ones(16))}


# ---- the measurement ---------------------------------------------------------------------------------------------

def test_cpu_peak_rss_sees_a_64_mib_allocation_and_not_a_small_one():
    res = harness.run_probe(_probe_peaks, {}, timeout=120)
    big, small = res["big"], res["small"]                               # 64 MiB, touched, held until read
    assert big["method"] in ("VmHWM", "ru_maxrss") and big["seconds"] > 0
    assert 60 * MiB < big["peak_bytes"] < 80 * MiB, big
    assert 0 <= small["peak_bytes"] < 4 * MiB, small


def test_ru_maxrss_fallback_in_a_fresh_process():
    res = harness.run_probe(_probe_without_clear_refs, {}, timeout=120)
    assert res["method"] == "ru_maxrss", res                 # the allocation beat the process's earlier peak
    assert res["allocated"] - 12 * MiB < res["peak_bytes"] < res["allocated"] + 48 * MiB, res


def test_run_probe_returns_json_and_turns_failures_into_one_line_reasons():
    assert harness.run_probe(_probe_ok, {"n": 3}, timeout=120) == {"n": 3, "threads": torch.get_num_threads()}
    with pytest.raises(ProbeFailed, match="exit code 1: RuntimeError: second line|exit code 1: second line"):
        harness.run_probe(_probe_raises, {}, timeout=120)
    with pytest.raises(ProbeFailed, match=r"killed by SIGKILL \(out of memory\?\)"):
        harness.run_probe(_probe_killed, {}, timeout=120)
    with pytest.raises(ProbeFailed, match="timed out after 0.5 s"):
        harness.run_probe(_probe_sleeps, {}, timeout=0.5)


def test_case_round_trips_through_json():
    c = Case("attention_memory", "fwd", {"B": 1, "H": 1, "L": 8, "D": 4}, torch.float32, "cpu", x="L", tags=("t",))
    d = json.loads(json.dumps(harness.case_to_dict(c)))
    assert harness.case_from_dict(d) == c and harness.case_from_dict(d).x == "L"


def test_a_dead_probe_is_a_note_not_a_crash():
    ctx = BenchContext("cpu", tiny=True, progress=False)
    case = Case("toy_memory", "fwd", {"N": 1}, torch.float32, "cpu", x="N")
    rows = ctx.run_memory_cases([case], lambda c: [Provider("pyattn:killed", None, "pyattn:killed")], _probe_killed,
                                lambda c: 1.0, lambda c: harness.Work(1.0, "flop"))
    assert rows == []
    assert any("pyattn:killed peak memory not measured for toy_memory fwd N=1" in n and "SIGKILL" in n
               for n in ctx.notes)


# ---- the attention memory rows, end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def attention_memory_run(tmp_path_factory):
    """`pyattn bench --op attention --device cpu` at the tests' tiny setting, with the memory cases at L = 2048
    (about 15 s: the tiny timed cases, then one fresh process per memory provider)."""
    tmp = tmp_path_factory.mktemp("bench_mem")
    mp = pytest.MonkeyPatch()
    real = ba.memory_cases

    def cases_2048(ctx):
        return [Case(c.op, c.mode, {**c.shape, "L": MEM_L}, c.dtype, c.device, x=c.x) for c in real(ctx)]

    mp.setattr(ba, "memory_cases", cases_2048)
    args = argparse.Namespace(op="attention", device="cpu", dtype=None, quick=True, tiny=True, progress=False,
                              json=str(tmp / "attn.json"), csv=str(tmp / "attn.csv"), plot=str(tmp / "plots"))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = run.main(args)
    finally:
        mp.undo()
    return rc, buf.getvalue(), tmp


def test_tiny_setting_measures_memory_at_l_512():
    ctx = BenchContext("cpu", tiny=True, progress=False)
    assert [c.shape for c in ba.memory_cases(ctx)] == [{"B": 1, "H": 1, "L": 512, "D": 64}]
    ctx.quick, ctx.tiny = True, False
    assert [c.shape["L"] for c in ba.memory_cases(ctx)] == [16384]
    ctx.quick = False
    assert [c.shape["L"] for c in ba.memory_cases(ctx)] == [4096, 8192, 16384]
    assert ba.memory_cases(BenchContext("cpu", dtypes=[torch.bfloat16], tiny=True, progress=False)) == []
    names = [p.name for p in ba.memory_providers(ctx)(ba.memory_cases(ctx)[-1])]
    assert names[:2] == ["torch:sdpa-math", "torch:sdpa-flash"] and "pyattn:torch" in names   # the L x L reference
    assert "pyattn:triton" not in names


def test_attention_memory_rows_are_sane(attention_memory_run):
    rc, _, tmp = attention_memory_run
    assert rc == 0
    doc = json.loads((tmp / "attn.json").read_text())
    mem = {r["provider"]: r for r in doc["rows"] if r["op"] == "attention_memory"}
    assert {"torch:sdpa-math", "torch:sdpa-flash", "pyattn:torch"} <= set(mem), (set(mem), doc["notes"])
    lxl = 4 * MEM_L * MEM_L / MiB                                        # 16 MiB
    for r in mem.values():
        assert r["metric"] == "memory" and r["mode"] == "fwd" and r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["params"] == {"B": 1, "H": 1, "L": MEM_L, "D": 64} and r["reps"] == 1
        assert r["mem_ref_mb"] == pytest.approx(lxl)
        assert r["peak_mem_mb"] > 0, r                                   # the output alone is 0.5 MiB
        assert r["speedup"] is None and r["pct_of_ceiling"] is None and r["baseline"] == "torch:sdpa-math"
    assert mem["torch:sdpa-math"]["is_baseline"] and sum(r["is_baseline"] for r in mem.values()) == 1
    # the L x L ones hold at least one 16 MiB matrix; the flash-style ones only O(L) (q, k, v, out are 0.5 MiB each)
    for name in ("torch:sdpa-math", "pyattn:torch"):
        assert mem[name]["peak_mem_mb"] >= 0.9 * lxl, mem[name]
    flash = [n for n in ("torch:sdpa-flash", "pyattn:cpp") if n in mem]
    for name in flash:
        assert mem[name]["peak_mem_mb"] < 4, mem[name]
        assert mem[name]["peak_mem_mb"] < mem["torch:sdpa-math"]["peak_mem_mb"]
        assert mem[name]["peak_mem_mb"] < mem["pyattn:torch"]["peak_mem_mb"]
    # the timed rows are unchanged: no CPU peak memory there
    timed = [r for r in doc["rows"] if r["op"] != "attention_memory"]
    assert timed and all(r["metric"] == "time" and r["peak_mem_mb"] is None for r in timed)


def test_attention_memory_rows_in_table_csv_and_plot(attention_memory_run):
    _, out, tmp = attention_memory_run
    header = next(line for line in out.splitlines() if line.startswith("op "))
    assert "peak mem" in header
    lines = [line for line in out.splitlines() if line.startswith("attention_memory")]
    assert len(lines) >= 3 and all("MiB" in line and "% of ref)" in line and "(1 call)" in line for line in lines)
    assert any("ref = one B x H x L x L fp32 matrix" in line for line in out.splitlines())
    with open(tmp / "attn.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["op"] == "attention_memory"]
    assert len(rows) >= 3 and all(float(r["peak_mem_mb"]) > 0 and float(r["mem_ref_mb"]) == 16.0 for r in rows)
    png = tmp / "plots" / "attention_memory_fwd_float32_cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_target_is_checked_on_pyattn_cpp(attention_memory_run):
    _, _, tmp = attention_memory_run
    rows = json.loads((tmp / "attn.json").read_text())["rows"]
    if not any(r["provider"] == "pyattn:cpp" for r in rows if r["op"] == "attention_memory"):
        pytest.skip("pyattn:cpp did not run (C++ extension without the CPU attention kernel)")
    real = next(t for t in ba.targets() if t.op == "attention_memory")
    assert real.max_mem_ratio == 1 / 8 and real.kinds == ("pyattn:cpp",) and real.match({"L": 16384})
    tgt = Target(real.op, real.mode, real.device, lambda p: p["L"] == MEM_L, max_mem_ratio=real.max_mem_ratio,
                 dtypes=real.dtypes, kinds=real.kinds, text=real.text)
    lines = apply_targets(rows, [tgt])
    marked = {r["provider"]: r["meets_target"] for r in rows if r["target"] is not None}
    assert marked == {"pyattn:cpp": True}                # only the kind the target names; the L x L one is not judged
    assert len(lines) == 1 and lines[0].strip().startswith("MET") and "best pyattn:cpp peak mem" in lines[0]
    # the same check fails a provider above the ratio
    fake = [dict(r, peak_mem_mb=r["mem_ref_mb"] / 4) for r in rows if r["op"] == "attention_memory"]
    assert apply_targets(fake, [tgt])[0].strip().startswith("MISS")
