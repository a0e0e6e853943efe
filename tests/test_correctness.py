"""Forward and every gradient of the fused op against the float64 eager reference."""

import numpy as np
import pytest
import torch

import torchext
from cases import LAYOUTS, PLANS, cases
from conftest import (
    DEVICES, SHAPES, TESTING, TOL, assert_matches, eager_outputs, fused_outputs, make_inputs, reference_outputs,
    rel_err,
)

NAMES = ("z", "W", "V", "B", "A")


def check_against_reference(inputs, dtype, wants=(True,) * 5, plan="auto", equal_rows=0):
    """f and the requested gradients against the float64 reference: within
    TOL, or for float32 within 10x eager float32's own error. equal_rows: the
    batch is that many copies of one sample (an expanded z), whose sums round
    coherently: float32 is then held to the summation bound equal_rows · eps,
    which eager's blocked reductions may beat and a BLAS's may not. That bound
    holds for sums without cancellation, and with copies of one sample every
    weight gradient is (Σ g) times one sample's, so such a batch gets a
    positive incoming gradient g (a random one's Σ g cancels: at N = 1100,
    Σ|g| / |Σ g| was 2072, and the errors hung on the summation order)."""
    g = None
    if equal_rows:
        g = 0.5 + torch.rand(inputs[0].shape[:-1], generator=torch.Generator().manual_seed(1),
                             dtype=torch.float64)
    f_ref, g, grads_ref = reference_outputs(inputs, wants=wants, g=g)
    f, grads = fused_outputs(inputs, g, wants, plan)
    assert f.dtype == inputs[0].dtype and f.device == inputs[0].device
    eager = [None] * 6
    if dtype == torch.float32:
        f_e, grads_e = eager_outputs(inputs, g)
        eager = [f_e] + grads_e
    for name, t, got, ref, eag in zip(("f",) + NAMES, [f] + list(inputs), [f] + grads, [f_ref] + grads_ref, eager):
        if ref is None:
            assert got is None
            continue
        assert got.dtype == t.dtype and got.shape == t.shape, name
        bound = TOL[dtype] if eag is None else max(TOL[dtype], 10 * rel_err(eag, ref),
                                                      equal_rows * torch.finfo(dtype).eps)
        err = rel_err(got, ref)
        assert err <= bound, f"{plan} d{name}: relative error {err:.3g} > {bound:.2g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", cases(dtypes=(torch.float32, torch.float64)))
def test_forward_and_gradients(case, device):
    check_against_reference(case.inputs(device), case.dtype, plan=case.plan)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", cases(shapes=("primes", "narrow-odd-k", "saved", "chunk-and-tail"),
                                       layouts=LAYOUTS[1:], dtypes=(torch.float32, torch.float64)))
def test_views(case, device):
    inputs = case.inputs(device)
    assert any(not t.is_contiguous() or t.storage_offset() for t in inputs)
    equal_rows = inputs[0].shape[:-1].numel() if case.layout == "expanded" else 0
    check_against_reference(inputs, case.dtype, plan=case.plan, equal_rows=equal_rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", cases(shapes=("primes", "narrow-odd-k", "saved", "chunk-and-tail", "partitions"),
                                       values=("kinks", "dead-units"), dtypes=(torch.float32, torch.float64)))
def test_kinks_and_dead_units(case, device):
    check_against_reference(case.inputs(device), case.dtype, plan=case.plan)


@pytest.mark.parametrize("device", DEVICES)
def test_stride_zero_incoming_gradient(device):
    inputs = [t.requires_grad_() for t in make_inputs(SHAPES["primes"], torch.float64, device, seed=7)]
    torchext.two_layer_square(*inputs).sum().backward()  # .sum() gives an expanded gradient
    leaves = [t.detach().cpu().requires_grad_() for t in inputs]
    torchext.reference.two_layer_square(*leaves).sum().backward()
    for t, ref in zip(inputs, leaves):
        assert_matches(t.grad, ref.grad, torch.float64)


def assert_within_ulps(got, want64, dtype, what, ulps=2):
    """got (in dtype) within `ulps` units in the last place of want64 rounded
    to dtype, elementwise: the result of computing in float32 and rounding
    once. The floor, far below one ulp of the largest element, admits
    float32's own rounding in elements that cancel to near zero."""
    want = want64.to(dtype)
    spacing = (torch.nextafter(want.abs(), torch.tensor(float("inf"), dtype=dtype)) - want.abs()).double()
    diff = (got.double() - want.double()).abs()
    floor = 1e-5 * want64.abs().max().item() if want64.numel() else 0.0
    bad = diff > ulps * spacing + floor
    assert not bad.any(), f"{what}: {int(bad.sum())} elements more than {ulps} ulps off, worst {diff.max().item():.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", cases(shapes=("primes", "two-leading", "narrow-odd-k", "saved", "chunk-and-tail"),
                                       dtypes=(torch.bfloat16, torch.float16)))
def test_half_precision_inputs(case, device):
    # The oracle: the float64 reference on the same half inputs, rounded once
    # to the half dtype. The op computes in float32 and rounds once.
    inputs = case.inputs(device)
    f_ref, g, _ = reference_outputs(inputs)
    g = g.to(case.dtype)  # the incoming gradient the op gets, rounded
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    grads_ref = torch.autograd.grad(torchext.reference.two_layer_square(*leaves), leaves, g.double())
    f, grads = fused_outputs(inputs, g, (True,) * 5, case.plan)
    assert f.dtype == case.dtype
    tensor_cores = on_tensor_cores(case, inputs)
    for name, got, ref in zip(("f",) + tuple(f"d{n}" for n in NAMES), [f, *grads], [f_ref, *grads_ref]):
        assert got.dtype == case.dtype and got.shape == ref.shape
        if tensor_cores:
            # The README's bound for the tensor-core tiles (operands staged in bfloat16).
            assert rel_err(got, ref) < 1e-2, name
        else:
            assert_within_ulps(got.cpu(), ref, case.dtype, name)


def on_tensor_cores(case, inputs):
    """Whether the op runs these inputs on the CUDA tensor-core tiles:
    bfloat16 on an sm_80+ GPU, on the quadratic plan's fused kernels."""
    z, W, V, B, A = inputs
    if not (z.is_cuda and z.dtype == torch.bfloat16 and torch.cuda.get_device_capability(z.device)[0] >= 8):
        return False
    rows = z.shape[:-1].numel()
    return TESTING._plan(rows, z.shape[-1], W.shape[0], V.shape[0], B.shape[0], case.plan, True) == "quadratic"


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(dtype, plan):
    # float16: y = 300 overflows when squared (90000 > 65504), f = 0.01 · y² = 900
    # does not, so f is finite only if y² is formed and scaled in float32.
    # bfloat16 has float32's exponent range: there the exact results check that
    # y² is not rounded to bfloat16 before it is scaled (90112 · a would round
    # to another bfloat16).
    one = torch.ones(1, 1, dtype=dtype)
    z, W, B = torch.ones(2, 1, dtype=dtype), one, one
    V = torch.full((1, 1), 300.0, dtype=dtype)
    A = torch.full((1, 1), 0.01, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (z, W, V, B, A)]
    f = torchext.two_layer_square(*leaves, plan=plan)
    expected = (A.double() * 300.0**2).to(dtype).reshape(1).expand(2)
    assert torch.equal(f, expected), f
    gz, gW, gV = torch.autograd.grad(f.sum(), leaves[:3])
    assert torch.equal(gV, (2 * 2 * A.double() * 300.0).to(dtype)), gV  # Σ_n 2 a y r
    assert torch.equal(gz, (2 * A.double() * 300.0**2).to(dtype).expand(2, 1)), gz


def numpy_gradients(z, W, V, B, A, g):
    """The problem statement's closed forms, one sample at a time, in numpy."""
    a = A.reshape(-1)
    dz = np.zeros_like(z)
    dW, dV, dB, dA = (np.zeros_like(W), np.zeros_like(V), np.zeros_like(B), np.zeros_like(a))
    f = np.zeros(z.shape[0])
    for n in range(z.shape[0]):
        x = W @ z[n]
        r = np.maximum(x, 0.0)
        h = (x > 0).astype(float)
        y = B @ V @ r
        f[n] = a @ (y * y)
        s = B.T @ (a * y)  # Bᵀ(a⊙y)
        dV += g[n] * 2 * np.outer(s, r)
        p = h * (V.T @ s)
        dW += g[n] * 2 * np.outer(p, z[n])
        dz[n] = g[n] * 2 * (W.T @ p)
        dB += g[n] * 2 * np.outer(a * y, V @ r)
        dA += g[n] * y * y
    return f, [dz, dW, dV, dB, dA.reshape(A.shape)]


@pytest.mark.parametrize("batched", [False, True])
def test_numpy_closed_form_oracle(batched):
    shape = ((17,), 6, 5, 4, 3) if batched else ((), 6, 5, 4, 3)
    inputs = [t.requires_grad_() for t in make_inputs(shape, torch.float64, seed=13)]
    f = torchext.two_layer_square(*inputs)
    g = torch.randn(f.shape, dtype=torch.float64)
    grads = torch.autograd.grad(f, inputs, g)
    arrays = [t.detach().numpy().reshape(-1, t.shape[-1]) if i == 0 else t.detach().numpy() for i, t in enumerate(inputs)]
    f_np, grads_np = numpy_gradients(*arrays, g.reshape(-1).numpy())
    np.testing.assert_allclose(f.detach().reshape(-1).numpy(), f_np, rtol=1e-12, atol=1e-12)
    for name, gr, ref in zip(NAMES, grads, grads_np):
        np.testing.assert_allclose(gr.reshape(ref.shape).numpy(), ref, rtol=1e-11, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_returns_only_requested(device):
    inputs = make_inputs(SHAPES["small"], torch.float64, device, seed=2)
    _, g, ref = reference_outputs(inputs)
    for mask in ([True, False, True, False, False], [False] * 5, [False, False, False, False, True], [True] * 5):
        out = torch.ops.torchext.two_layer_square_backward(g.to(device), *inputs, mask)
        assert len(out) == 5
        for name, want, o, r in zip(NAMES, mask, out, ref):
            if want:
                assert_matches(o, r, torch.float64, name)
            else:
                assert o is None, name


@pytest.mark.parametrize("device", DEVICES)
def test_results_are_bitwise_reproducible(device):
    inputs = [t.requires_grad_() for t in make_inputs(SHAPES["many-chunks"], torch.float32, device, seed=4)]
    runs = []
    for _ in range(2):
        f = torchext.two_layer_square(*inputs)
        runs.append([f, *torch.autograd.grad(f.sum(), inputs)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_float32_accuracy_close_to_eager():
    # The fused float32 result is as accurate as eager float32 (same association order).
    inputs = make_inputs(((257,), 64, 48, 40, 32), torch.float32, seed=21)
    f_ref, g, grads_ref = reference_outputs(inputs)
    f, grads = fused_outputs(inputs, g)
    f_eager, grads_eager = eager_outputs(inputs, g)
    assert rel_err(f, f_ref) <= 10 * max(rel_err(f_eager, f_ref), 1e-7)
    for gr, ge, ref in zip(grads, grads_eager, grads_ref):
        assert rel_err(gr, ref) <= 10 * max(rel_err(ge, ref), 1e-7)
