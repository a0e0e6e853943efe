"""Runs bench.py's `--device cuda` branch on the CPU, with torch.cuda's events,
synchronisation and device queries faked and the GPU cases shrunk: a check
that the GPU benchmark's own code (CUDA-event timing, rotating input sets,
ceilings, FLOP/byte floors, bfloat16 check, the per-case record) runs to the
end before a scarce GPU session depends on it. Timings it prints mean nothing.

    python benchmarks/fake_cuda_smoke.py OUT_DIR
"""
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


class _HostEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def _without_device(fn):
    def call(*args, **kwargs):
        kwargs.pop("device", None)
        return fn(*args, **kwargs)
    return call


def main(out):
    torch.cuda.Event = _HostEvent
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_device_name = lambda i=0: "NVIDIA H200"
    torch.cuda.get_device_properties = lambda i=0: types.SimpleNamespace(L2_cache_size=1 << 20)
    make_case = bench.make_case
    bench.make_case = lambda shape, device, dtype=torch.float32, seed=0: make_case(shape, "cpu", dtype, seed)
    torch.randn = _without_device(torch.randn)
    torch.empty = _without_device(torch.empty)
    bench.GPU_CASES = {"gpu-seed-vector": (None, 16, 16, 16, 16), "gpu-small": (256, 32, 32, 32, 32),
                       "gpu-large": (3000, 64, 64, 64, 64)}
    ceilings = bench.gpu_ceilings(n=256, copy_elems=1 << 20)
    bench.gpu_ceilings = lambda: ceilings
    record = bench.main(["--device", "cuda", "--quick", "--sweep", "0", "--no-memory", "--no-compile",
                         "--min-run-time", "0.05", "--out", out])
    assert [r["name"] for r in record["cases"]] == list(bench.GPU_CASES)
    assert record["complete"] and record["bf16"]["bf16_rel_err_f_vs_float64"] < 1e-2
    assert all(0 < r["fraction_of_floor"] for r in record["cases"])
    assert os.path.exists(os.path.join(out, f"{record['date'][:10]}-nvidia-h200.json"))
    print("fake-cuda bench smoke: ok")


if __name__ == "__main__":
    main(sys.argv[1])
