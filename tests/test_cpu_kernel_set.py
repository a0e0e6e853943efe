"""TORCHEXT_CPU_KERNELS and what build_info reports: every value, in a fresh
process each (the library reads the variable once)."""
import json
import os
import subprocess
import sys

import platform

import pytest

import torchext
from conftest import cpu_kernel_sets_this_cpu_runs

# The expected choice comes from /proc/cpuinfo's flags.
pytestmark = pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")),
                                reason="the expectations read /proc/cpuinfo (Linux x86-64)")

PROBE = """
import json, torch, torchext
info = torchext.build_info()
torch.manual_seed(0)
x = [torch.randn(5, 7), torch.randn(11, 7), torch.randn(13, 11), torch.randn(3, 13), torch.randn(1, 3)]
x64 = [t.double() for t in x]
try:
    f = torchext.two_layer_square(*x).double()
    error = None
    # float32's error is relative to Σ|a| y², not to f (A's signs can cancel)
    scale = torchext.reference.two_layer_square(*x64[:4], x64[4].abs())
    matches = bool(((f - torchext.reference.two_layer_square(*x64)).abs() <= 1e-5 * scale + 1e-6).all())
except RuntimeError as e:
    error, matches = str(e), None
# jvp of jvp: the route of differentiable torch ops (nested forward levels)
F = lambda w: torchext.two_layer_square(x[0], w, *x[2:])
try:
    torch.func.jvp(lambda w: torch.func.jvp(F, (w,), (torch.ones_like(w),))[1], (x[1],), (torch.ones_like(x[1]),))
    nested_error = None
except RuntimeError as e:
    nested_error = str(e)
import os
os.environ["TORCHEXT_CPU_KERNELS"] = "neon"  # too late: read when torchext loaded
read_once = torchext.build_info()["cpu_kernels"] == info["cpu_kernels"]
print(json.dumps({"cpu_kernels": info["cpu_kernels"], "cpu_kernels_error": info["cpu_kernels_error"],
                  "avx512": info["cpu_avx512_kernels"], "call_error": error, "matches": matches,
                  "nested_error": nested_error, "read_once": read_once}))
"""


def probe(value):
    env = {k: v for k, v in os.environ.items() if k != "TORCHEXT_CPU_KERNELS"}
    if value is not None:
        env["TORCHEXT_CPU_KERNELS"] = value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


COMPILED = torchext.build_info()["cpu_kernels"]["float32"]["compiled"]
RUNNABLE = set(COMPILED) & (cpu_kernel_sets_this_cpu_runs() or {"generic"})


# (One fresh process each; on x86 neon stands for the sets not built, fast for any other word.)
@pytest.mark.parametrize("value", [None, "generic", "avx512", "avx2", "neon", "fast"])
def test_each_choice_runs_or_refuses_clearly(value):
    got = probe(value)
    asked = value or "auto"
    want = (max(RUNNABLE, key=["generic", "neon", "avx2", "avx512"].index) if asked == "auto"
            else asked if asked in RUNNABLE else None)
    assert got["cpu_kernels"]["float32"]["compiled"] == COMPILED and got["read_once"]
    assert got["cpu_kernels"]["float32"]["running"] == want
    # The choice holds for every dtype: float64 (always generic) refuses with it.
    assert got["cpu_kernels"]["float64"] == {"compiled": ["generic"], "running": want and "generic"}
    if want is None:  # refused: named in build_info and in the error of every call, never a crash
        assert f"TORCHEXT_CPU_KERNELS={asked}" in got["cpu_kernels_error"]
        for route in ("call_error", "nested_error"):
            assert got[route] is not None and got["cpu_kernels_error"] in got[route], route
        assert got["avx512"] is False
    else:
        assert got["cpu_kernels_error"] is None and got["call_error"] is None and got["matches"]
        assert got["nested_error"] is None
        assert got["avx512"] == (want == "avx512")


def test_generic_kernels_call_a_blas():
    # torch's Linux wheels export their BLAS; without one the generic kernels
    # would run portable loops, which build_info and a warning at import say.
    assert torchext.build_info()["cpu_blas"] in ("MKL", "BLAS")
