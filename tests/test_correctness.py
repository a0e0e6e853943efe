"""Forward and every gradient of the fused op against the float64 eager reference."""
import itertools

import numpy as np
import pytest
import torch

import torchext
from conftest import (
    DEVICES, SHAPES, TOL, assert_matches, eager_outputs, fused_outputs, make_inputs, reference_outputs, rel_err,
)

NAMES = ("z", "W", "V", "B", "A")


def check_against_reference(inputs, dtype, wants=(True,) * 5, a_shape=None):
    f_ref, g, grads_ref = reference_outputs(inputs, wants=wants)
    f, grads = fused_outputs(inputs, g, wants)
    assert f.dtype == inputs[0].dtype and f.device == inputs[0].device
    assert_matches(f, f_ref, dtype, "f")
    for name, t, gr, ref in zip(NAMES, inputs, grads, grads_ref):
        if ref is None:
            assert gr is None
            continue
        assert gr.dtype == t.dtype and gr.shape == t.shape, name
        assert_matches(gr, ref, dtype, f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_forward_and_gradients(shape, dtype, device):
    for seed in range(2):  # fresh inputs each time
        inputs = make_inputs(SHAPES[shape], dtype, device, seed=seed, a_vector=bool(seed))
        check_against_reference(inputs, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wants", list(itertools.product([False, True], repeat=5)), ids=lambda w: "".join("zWVBA"[i] if x else "-" for i, x in enumerate(w)))
def test_every_subset_requiring_grad(wants, device):
    inputs = make_inputs(SHAPES["primes"], torch.float64, device, seed=3)
    check_against_reference(inputs, torch.float64, wants=wants)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_views(dtype, device):
    z, W, V, B, A = make_inputs(((6, 5), 9, 7, 5, 4), dtype, device, seed=5)
    views = (
        z.transpose(0, 1),                     # (5, 6, 9), non-contiguous batch
        W.T.contiguous().T,                    # column-major W
        V[:, :].T.contiguous().T,              # column-major V
        torch.cat([B, B], 1)[:, ::2],          # strided B
        A.reshape(-1)[:1].expand(4),           # stride-0 A (ell,)
    )
    assert not any(t.is_contiguous() for t in views)
    check_against_reference(views, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_stride_zero_incoming_gradient(device):
    inputs = [t.requires_grad_() for t in make_inputs(SHAPES["primes"], torch.float64, device, seed=7)]
    torchext.two_layer_square(*inputs).sum().backward()  # .sum() gives an expanded gradient
    leaves = [t.detach().cpu().requires_grad_() for t in inputs]
    torchext.reference.two_layer_square(*leaves).sum().backward()
    for t, ref in zip(inputs, leaves):
        assert_matches(t.grad, ref.grad, torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_inputs(dtype, device):
    inputs = make_inputs(SHAPES["wide"], dtype, device, seed=11)
    f_ref, g, grads_ref = reference_outputs(inputs)  # float64 on the same rounded inputs
    f, grads = fused_outputs(inputs, g, (True,) * 5)
    assert f.dtype == dtype
    assert_matches(f, f_ref, dtype, "f")
    for name, gr, ref, t in zip(NAMES, grads, grads_ref, inputs):
        assert gr.dtype == dtype and gr.shape == t.shape
        assert_matches(gr, ref, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_overflow_is_float32_accumulated(dtype):
    # Squares of 300 overflow float16 (max 65504) but not float32: f is inf only
    # where the float32 result exceeds the output dtype's range.
    z = torch.full((2, 1), 1.0, dtype=dtype)
    W = torch.ones(1, 1, dtype=dtype)
    V = torch.full((1, 1), 300.0, dtype=dtype)
    B = torch.ones(1, 1, dtype=dtype)
    A = torch.tensor([[1.0]], dtype=dtype)
    f = torchext.two_layer_square(z, W, V, B, A)
    expected = torch.tensor(90000.0).to(dtype)
    assert torch.equal(f, expected.expand(2)), f
    f_small = torchext.two_layer_square(z, W, V * 0.1, B, A)
    assert torch.isfinite(f_small).all()


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
