"""Where one forward+backward step spends its time, op by op and kernel by
kernel: torch.profiler over a few steps of benchmark cases, torchext and
eager side by side. scripts/gpu_check.sh runs it after the benchmark, so
that a GPU session leaves the breakdown the next change needs (the
benchmark's times say how far from a target a case is, this says where).

    python benchmarks/profile_step.py [--device cpu|cuda] [--cases a,b] [--steps 10] [--rows 12]

Same inputs as bench.py (W and V trainable, loss = f.sum()). A script, not a
test: the profiler's own overhead inflates the CPU columns.
"""
import argparse
import os
import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the cases and their inputs)

import torchext  # noqa: E402
from torchext import reference  # noqa: E402

DEFAULT_CASES = {"cpu": "small,medium", "cuda": "gpu-small,gpu-medium,gpu-large"}


def profile_case(name, shape, device, steps, rows):
    z, W, V, B, A = bench.make_case(shape, device)
    N = shape[0] or 1
    plan = bench.TESTING._plan(N, *shape[1:])
    fns = {
        "torchext": lambda: torchext.two_layer_square(z, W, V, B, A).sum().backward(),
        "eager": lambda: reference.two_layer_square(z, W, V, B, A).sum().backward(),
    }
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    for who, fn in fns.items():
        for _ in range(3):  # warm-up: allocator, cuBLAS handles, one-time attributes
            fn()
        sync()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            sync()
        kernels = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
        launches = f", {kernels / steps:.0f} GPU activities a step (kernels, copies, fills)" if device == "cuda" else ""
        batch = shape[0] if shape[0] is not None else "none (z a vector)"
        print(f"\n=== {name} (N={batch}, d,k,m,ell={','.join(map(str, shape[1:]))}, plan {plan}): "
              f"{who}, {steps} steps{launches}")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", default="", help="comma-separated bench.py case names")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args(argv)
    cases = bench.GPU_CASES if args.device == "cuda" else bench.CPU_CASES
    names = (args.cases or DEFAULT_CASES[args.device]).split(",")
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; {args.device} cases: {', '.join(cases)}")
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else bench.cpu_name()
    print(f"torchext step profile on {args.device} ({card}), torch {torch.__version__}")
    for name in names:
        profile_case(name, cases[name], args.device, args.steps, args.rows)


if __name__ == "__main__":
    main()
