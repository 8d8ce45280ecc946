"""`pyattn info` tells the truth, and `import pyattn` survives a missing extension or Triton."""
import subprocess
import sys

import pyattn
from pyattn.cli import main


def test_info_lists_every_backend_with_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name, ok, why in pyattn.backends():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert ("unavailable" not in line) == ok
        if not ok:
            assert why in out  # the reason is printed
    for op in ("attention", "layer_norm", "rms_norm", "gru_cell", "gru"):
        assert f"  {op} " in out


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_import_without_extension_falls_back_to_torch():
    # sys.modules[name] = None makes `import pyattn._C` raise ImportError, as if the extension were not built.
    out = _run("import sys; sys.modules['pyattn._C'] = None\n"
               "import torch, pyattn\n"
               "b = dict((n, (ok, why)) for n, ok, why in pyattn.backends())\n"
               "print(b['cpp'][0], b['cpp'][1])\n"
               "x = torch.randn(3, 8)\n"
               "print(torch.allclose(pyattn.layer_norm(x, (8,)), torch.nn.functional.layer_norm(x, (8,)), atol=1e-6))\n"
               "print(pyattn.explain('layer_norm', x, (8,)).splitlines()[1])")
    lines = out.splitlines()
    assert lines[0].startswith("False pyattn._C failed to load: ModuleNotFoundError")
    assert lines[1] == "True"
    assert "selected: torch" in lines[2]


def test_import_without_triton():
    out = _run("import sys; sys.modules['triton'] = None\n"
               "import pyattn\n"
               "print([r for n, ok, r in pyattn.backends() if n == 'triton'][0])")
    assert "triton is not importable" in out


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "pyattn", "info"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "backends:" in res.stdout
