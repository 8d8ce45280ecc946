"""pyattn._C runs on torch's C++ runtime (setup.py links the shared libstdc++ the interpreter loaded with torch).

A g++ whose library directory holds only libstdc++.a (the GPU machines' /opt/gcc wrapper) once gave the extension a
private static copy whose std::locale was never set up: every TORCH_CHECK message that formats a number lost it
("got shape [" here) or segfaulted (on the H200 machine), so a bad argument killed the process instead of raising.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import pyattn  # noqa: F401  (loads pyattn._C when it was built)

_C = sys.modules.get("pyattn._C")
pytestmark = pytest.mark.skipif(_C is None, reason="pyattn._C is not built (pip install --no-build-isolation -e .)")


def test_error_messages_keep_their_numbers():
    with pytest.raises(RuntimeError, match=r"x must be 2-D \(M, N\) \(got shape \[8\]\)"):
        torch.ops.pyattn.layer_norm_fwd(torch.randn(8), None, None, None, 1e-5, False, True)
    with pytest.raises(RuntimeError, match=r"eps must be a finite number >= 0 \(got -0\.5\)"):
        torch.ops.pyattn.layer_norm_fwd(torch.randn(2, 8), None, None, None, -0.5, False, True)
    assert torch.ops.pyattn.layer_norm_fwd(torch.ones(2, 3), None, None, None, 1e-5, False, True)[0].shape == (2, 3)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="needs Linux and readelf (binutils) to read the extension's dynamic section")
def test_extension_needs_the_shared_libstdcxx():
    out = subprocess.run(["readelf", "-d", os.path.realpath(_C.__file__)], capture_output=True, text=True, check=True)
    needed = [line for line in out.stdout.splitlines() if "(NEEDED)" in line]
    assert any("libstdc++.so" in line for line in needed), needed
