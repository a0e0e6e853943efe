"""Reductions over the batch follow a partition fixed by the shapes alone:
results are bitwise equal across runs, thread counts and concurrent callers."""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import torchext
from conftest import make_inputs

SHAPES = [((5000,), 24, 40, 12, 9), ((3001,), 8, 8, 8, 8), ((700,), 64, 64, 32, 48),
          ((300,), 24, 32, 96, 80),  # a small batch split by its work per sample
          ((40,), 8, 8, 600, 800),  # wide V and B, read transposed by many panels
          ((40,), 8, 8, 1100, 2100)]  # (and buffers over the 8 MiB a thread keeps)
PLANS = ["direct", "folded", "quadratic"]


def run(inputs, plan):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    f = torchext.two_layer_square(*leaves, plan=plan)
    g = torch.linspace(-1, 1, f.numel()).reshape(f.shape)
    return [f.detach(), *torch.autograd.grad(f, leaves, g)]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bitwise_equal_across_thread_counts(shape, plan):
    inputs = make_inputs(shape, torch.float32, seed=2)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run(inputs, plan))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_concurrent_callers_match_serial():
    cases = [make_inputs(SHAPES[i % len(SHAPES)], torch.float32, seed=10 + i) for i in range(8)]
    serial = [run(c, "auto") for c in cases]
    results = [None] * len(cases)

    def worker(i):
        results[i] = run(cases[i], "auto")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_runs_under_use_deterministic_algorithms():
    inputs = make_inputs(SHAPES[0], torch.float32, seed=5)
    free = run(inputs, "auto")
    torch.use_deterministic_algorithms(True)
    try:
        strict = run(inputs, "auto")
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(free, strict):
        assert torch.equal(a, b)


THREADS_PROBE = r"""
import os, sys, json, torch, torchext
def busy_threads(fn, repeat):
    def ticks():
        out = {}
        for t in os.listdir("/proc/self/task"):
            fields = open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()
            out[t] = int(fields[11]) + int(fields[12])
        return out
    fn()
    before = ticks()
    for _ in range(repeat):
        fn()
    after = ticks()
    return sum(1 for t in after if after[t] - before.get(t, 0) > 0)
g = torch.Generator().manual_seed(0)
z, W, V, B, A = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((40000, 64), (64, 64), (64, 64), (64, 64), (1, 64)))
W.requires_grad_()
x = torch.randn(2048, 2048, dtype=torch.float64)
out = {"threads": torch.get_num_threads()}
for dtype in (torch.float32, torch.float64):
    args = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in (z, W, V, B, A)]
    out[str(dtype)] = busy_threads(lambda: torchext.two_layer_square(*args, plan=sys.argv[1]).sum().backward(), 10)
out["torch_after"] = busy_threads(lambda: x.exp(), 20)
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts busy threads in /proc/self/task (Linux, 2+ CPUs)")
@pytest.mark.parametrize("plan", ["direct", "quadratic"])
def test_kernels_use_every_thread_and_leave_torchs_threads_alone(plan):
    # A fresh process with torch's default thread count. ATen's parallel_for is
    # inline OpenMP code: built without -fopenmp it would run on one thread;
    # and an MKL thread setting around a thread's first parallel_for would
    # leave that thread, and every torch op it runs later, on one thread. That
    # first parallel_for is the chunk loop's (direct plan) or the head
    # products' (quadratic).
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    run = subprocess.run([sys.executable, "-c", THREADS_PROBE, plan], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    if got["threads"] < 2:
        pytest.skip("torch runs one intra-op thread here")
    assert got["torch.float32"] >= 2 and got["torch.float64"] >= 2, got
    assert got["torch_after"] >= 2, got
