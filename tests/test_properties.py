"""Property-based tests (hypothesis): random shapes (0 and 1 included), dtypes,
strides, views, every plan and subsets of inputs requiring grad, against the
float64 reference, element by element.

The allowance follows the a-priori rounding-error bound of the computation
(a simplified count of its terms, not a proof), which holds for every
association of its sums (each plan's): each sum of n terms
errs by at most n·eps times the sum of the terms' magnitudes (Higham's γ_n),
and the sums of magnitudes are the reference itself evaluated on |inputs|
and |g|. Chained, n is the number of terms along the longest path (batch and
every width) plus one rounding for each product and scaling. Halves compute
in float32 and round once: one unit in the last place more. Eager's own error
is no yardstick here: in float64 eager is the reference, and the folded and
quadratic plans lose accuracy with the square of the cancellation where eager
loses it linearly (README, "Accuracy"); the a-priori bound covers both."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchext
from conftest import reference_outputs

NAMES = ("z", "W", "V", "B", "A")
HALVES = (torch.bfloat16, torch.float16)
ROUNDINGS = 10  # the products and scalings along the chain (y², a·y², 2·g·a·y, …), each rounded once


def layout(t, kind):
    """The same values in another memory layout."""
    if kind == "transposed" and t.dim() == 2:
        return t.T.contiguous().T
    if kind == "strided":
        return torch.stack([t, t], -1)[..., 0]
    if kind == "expanded" and t.numel():  # stride 0: one value broadcast
        return t.reshape(-1)[:1].expand(t.shape)
    return t


@st.composite
def problems(draw):
    batch = draw(st.lists(st.integers(0, 6), min_size=0, max_size=2))
    d, k, m, ell = (draw(st.integers(0, 9)) for _ in range(4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, *HALVES]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    shapes = [(*batch, d), (k, d), (m, k), (ell, m), draw(st.sampled_from([(1, ell), (ell,)]))]
    inputs = [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    inputs = [layout(t, draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))) for t in inputs]
    wants = tuple(draw(st.lists(st.booleans(), min_size=5, max_size=5)))
    plan = draw(st.sampled_from(["auto", "direct", "folded", "quadratic"]))
    return inputs, wants, plan, dtype, seed


def terms_summed(inputs):
    """The number of terms along the longest path of sums: the batch (the
    weight gradients sum over it) and every width, plus the roundings."""
    z, W, V, B, _ = inputs
    return z.shape[:-1].numel() + z.shape[-1] + W.shape[0] + V.shape[0] + B.shape[0] + ROUNDINGS


def ulp(x, dtype):
    """The spacing of dtype's numbers at x rounded to dtype (elementwise, in float64)."""
    r = x.to(dtype).abs()
    return (torch.nextafter(r, torch.full_like(r, float("inf"))) - r).double()


def assert_within_rounding(name, got, want, magnitude, n, dtype):
    compute = torch.float32 if dtype in HALVES else dtype
    allowed = n * torch.finfo(compute).eps * magnitude
    if dtype in HALVES:
        allowed = allowed + ulp(want, dtype)
    err = (got.detach().double() - want).abs()
    bad = err > allowed
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements beyond the rounding bound, "
                           f"worst {(err - allowed).max().item():.3g} over")


# derandomize: CI runs the same examples every time (run with a different
# seed locally to explore: pytest --hypothesis-seed=N needs derandomize off).
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_reference(problem):
    inputs, wants, plan, dtype, seed = problem
    leaves = [t.detach().requires_grad_(w) for t, w in zip(inputs, wants)]
    f = torchext.two_layer_square(*leaves, plan=plan)
    assert f.shape == inputs[0].shape[:-1] and f.dtype == dtype
    g = torch.randn(f.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    req = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(f, req, g) if req else ())
    got = [f] + [next(grads) if w else None for w in wants]
    f_ref, _, grads_ref = reference_outputs(inputs, wants=wants, g=g)
    f_mag, _, grads_mag = reference_outputs([t.abs() for t in inputs], wants=wants, g=g.abs())
    want, magnitudes = [f_ref] + grads_ref, [f_mag] + grads_mag
    n = terms_summed(inputs)
    for name, t, o, w, mag in zip(("f",) + NAMES, [f] + leaves, got, want, magnitudes):
        if w is None:
            assert o is None, name
            continue
        assert o.shape == t.shape and o.dtype == dtype, name
        assert_within_rounding(name, o, w, mag, n, dtype)
