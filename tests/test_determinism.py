"""Reductions over the batch follow a partition fixed by the shapes alone:
results are bitwise equal across runs, thread counts and concurrent callers."""
import threading

import pytest
import torch

import torchext
from conftest import make_inputs

SHAPES = [((5000,), 24, 40, 12, 9), ((3001,), 8, 8, 8, 8), ((700,), 64, 64, 32, 48)]
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
