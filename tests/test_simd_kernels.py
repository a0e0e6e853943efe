"""The SIMD CPU kernel sets (avx512, avx2, neon: the quadratic plan's
narrow-layer kernels, k <= 32, and the float32 product kernel of every plan):
against the float64 reference on odd sizes (block, vector and chunk edges,
saved and recomputed r and q, every gradient), every set this CPU runs
against the generic BLAS kernels, and with NaN inputs. CI runs this file, like
the whole suite, with each set forced (TORCHEXT_CPU_KERNELS); the CPU must
really run the set asked for."""
import json
import os
import subprocess
import sys

import pytest
import torch

import torchext
from conftest import (assert_matches, cpu_kernel_sets_this_cpu_runs, eager_outputs, fused_outputs,
                      make_inputs, reference_outputs, rel_err)
from torchext.testing import load_testing_ops

TESTING = load_testing_ops()  # torch.ops.torchext_testing

NAMES = ("f", "dz", "dW", "dV", "dB", "dA")
KERNELS = torchext.build_info()["cpu_kernels"]["float32"]
RUNNABLE = cpu_kernel_sets_this_cpu_runs()


def test_the_widest_set_runs_unless_one_is_forced():
    if os.environ.get("TORCHEXT_NO_SIMD") == "1":
        assert KERNELS["compiled"] == ["generic"], "TORCHEXT_NO_SIMD=1 did not take"
    if RUNNABLE is None:
        pytest.skip("cannot read this CPU's features")
    forced = os.environ.get("TORCHEXT_CPU_KERNELS", "auto") or "auto"
    widest = next(s for s in KERNELS["compiled"] if s in RUNNABLE)
    assert KERNELS["running"] == (widest if forced == "auto" else forced)


# (batch, d, k, m, ell): N around the 16-sample vector, 32-sample pair and
# 128-sample block edges and across chunks; k from 1 to the limit 32 (and
# not multiples of 8); d below, at and above 16 (ragged transposes); d + k >= 64
# saves r and q in the forward, the others recompute them.
NARROW_SHAPES = [
    ((1,), 16, 16, 16, 16),
    ((15,), 3, 1, 2, 5),
    ((16,), 16, 16, 9, 9),
    ((17,), 17, 7, 4, 11),
    ((33,), 1, 31, 5, 40),
    ((129,), 48, 16, 7, 9),
    ((300,), 32, 32, 32, 32),
    ((257,), 64, 16, 5, 5),
    ((1025,), 16, 17, 6, 20),
    ((2, 3), 5, 8, 3, 2),
    ((0,), 16, 16, 16, 16),
    ((40,), 300, 16, 5, 5),  # d above the kernels' limit: the BLAS kernels
]


@pytest.mark.parametrize("shape", NARROW_SHAPES, ids=str)
def test_narrow_quadratic_float32_within_10x_of_eager(shape):
    for seed in range(2):
        inputs = make_inputs(shape, torch.float32, seed=300 + seed)
        f_ref, g, grads_ref = reference_outputs(inputs)
        f, grads = fused_outputs(inputs, g, plan="quadratic")
        f_e, grads_e = eager_outputs(inputs, g)
        for name, got, eag, ref in zip(NAMES, [f] + grads, [f_e] + grads_e, [f_ref] + grads_ref):
            assert got.shape == ref.shape and got.dtype == torch.float32
            if ref.numel() == 0:
                continue
            bound = 10 * max(rel_err(eag, ref), 1e-7)
            assert rel_err(got, ref) <= bound, f"{shape} {name}: {rel_err(got, ref):.2e} > {bound:.2e}"


def _outputs_json(cases):
    out = []
    for shape, plan, seed in cases:
        inputs = make_inputs(shape, torch.float32, seed=seed)
        f_ref, g, _ = reference_outputs(inputs)
        f, grads = fused_outputs(inputs, g, plan=plan)
        out.append([t.double().reshape(-1).tolist() for t in [f] + grads])
    return {"running": torchext.build_info()["cpu_kernels"]["float32"]["running"], "outputs": out}


def _outputs_with(kernel_set):
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        "import json, sys; sys.path.insert(0, %r); from test_simd_kernels import _outputs_json, AGREE_CASES; "
        "print(json.dumps(_outputs_json(AGREE_CASES)))" % (here,)
    )
    env = dict(os.environ, TORCHEXT_CPU_KERNELS=kernel_set)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["running"] == kernel_set
    return got["outputs"]


# The SIMD kernels (narrow kernels; the products of every plan) against the
# generic BLAS kernels: shapes around the product kernel's row tiles (8, 6,
# 4, 2, 1), column panels and lane masks, and a narrow-kernel one.
AGREE_CASES = [
    (((1000,), 24, 20, 12, 9), "quadratic", 7),
    (((67,), 33, 47, 17, 31), "direct", 8),
    (((67,), 33, 47, 17, 31), "folded", 9),
    (((300,), 64, 40, 5, 70), "quadratic", 10),
    (((1,), 16, 16, 16, 16), "direct", 11),
    (((13,), 1, 3, 2, 1), "direct", 12),
    (((515,), 70, 64, 64, 64), "direct", 13),
    # float32 rows of k = 64 are 256 bytes: p and g ⊙ r on a padded row stride
    (((300,), 40, 64, 20, 30), "quadratic", 14),
    (((300,), 40, 64, 20, 30), "folded", 15),
]


@pytest.mark.parametrize("kernel_set", ["avx512", "avx2", "neon"])
def test_each_simd_set_agrees_with_the_generic_blas_kernels(kernel_set):
    if kernel_set not in KERNELS["compiled"] or RUNNABLE is None or kernel_set not in RUNNABLE:
        pytest.skip(f"{kernel_set} is not compiled in or this CPU cannot run it")
    # (the set running here is measured in process; the others each in a fresh one)
    fast = _outputs_json(AGREE_CASES)["outputs"] if KERNELS["running"] == kernel_set else _outputs_with(kernel_set)
    generic = _outputs_json(AGREE_CASES)["outputs"] if KERNELS["running"] == "generic" else _outputs_with("generic")
    for case, got, want in zip(AGREE_CASES, fast, generic):
        for name, a, b in zip(NAMES, got, want):
            a, b = torch.tensor(a), torch.tensor(b)
            assert rel_err(a, b) < 1e-5, (case, name)


def test_narrow_kernels_nan_rows_stay_in_their_samples():
    # A NaN sample gives NaN f for that sample only; its gradient contributions
    # poison dW and the head's gradients exactly as in eager float32.
    z, W, V, B, A = make_inputs(((200,), 16, 16, 16, 16), torch.float32, seed=11)
    z[37, 3] = float("nan")
    f_ref, g, _ = reference_outputs((z, W, V, B, A))
    f, grads = fused_outputs((z, W, V, B, A), g, plan="quadratic")
    f_e, grads_e = eager_outputs((z, W, V, B, A), g)
    assert torch.equal(torch.isnan(f), torch.isnan(f_e)) and torch.isnan(f).sum() == 1
    for name, got, eag in zip(NAMES[1:], grads, grads_e):
        assert torch.equal(torch.isnan(got), torch.isnan(eag)), name
    # Without the NaN sample everything is finite and matches.
    keep = torch.ones(200, dtype=torch.bool)
    keep[37] = False
    rest = (z[keep], W, V, B, A)
    f_ref2, _, grads_ref2 = reference_outputs(rest)
    g2 = torch.randn(f_ref2.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [t.double().requires_grad_() for t in rest]
    grads_ref2 = torch.autograd.grad(torchext.reference.two_layer_square(*leaves), leaves, g2)
    f2, grads2 = fused_outputs(rest, g2, plan="quadratic")
    assert_matches(f2, f_ref2, torch.float32, "f")
    for name, got, ref in zip(NAMES[1:], grads2, grads_ref2):
        assert_matches(got, ref, torch.float32, "d" + name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matmul_on_odd_shapes_and_layouts(dtype):
    # The product kernel itself (the running SIMD set's, else BLAS): tile
    # edges (8 and 6 rows, 8, 16 and 32 columns), K = 0 and 1, row blocks of
    # 64, transposed operands.
    mm = TESTING._cpu_matmul
    g = torch.Generator().manual_seed(3)
    for M, K, N in [(1, 1, 1), (7, 5, 3), (8, 16, 32), (9, 17, 33), (13, 0, 5), (64, 64, 64),
                    (65, 31, 47), (130, 1, 17), (0, 4, 4), (3, 300, 2), (6, 7, 16), (11, 13, 9),
                    (23, 29, 5)]:
        a = torch.randn(M, K, generator=g, dtype=torch.float64)
        b = torch.randn(K, N, generator=g, dtype=torch.float64)
        want = a @ b
        for x, y in [(a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())]:
            got = mm(x.to(dtype), y.to(dtype))
            assert got.shape == (M, N) and got.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            assert torch.allclose(got.double(), want, rtol=tol, atol=tol * max(1, K)), (M, K, N)


def test_cpu_matmul_bad_input_names_the_argument():
    mm = TESTING._cpu_matmul
    with pytest.raises(RuntimeError, match="2-D"):
        mm(torch.ones(3), torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="columns"):
        mm(torch.ones(2, 3), torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="float32 or both float64"):
        mm(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.float64))
