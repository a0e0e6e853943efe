"""NaN, infinities, empty batches and zero widths behave as the eager composition."""
import pytest
import torch

import torchext
from cases import cases
from conftest import DEVICES, SHAPES, TESTING, assert_matches, make_inputs, reference_outputs

NAMES = ("z", "W", "V", "B", "A")


def both(inputs, g=None):
    """(f, grads) of the fused op and of the eager reference, same dtype."""
    results = []
    for fn in (torchext.two_layer_square, torchext.reference.two_layer_square):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        f = fn(*leaves)
        gout = torch.ones_like(f) if g is None else g
        grads = torch.autograd.grad(f, leaves, gout)
        results.append((f.detach(), grads))
    return results


def same_nonfinite_pattern(a, b, what):
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN pattern differs"
    assert torch.equal(torch.isinf(a), torch.isinf(b)) or torch.equal(~torch.isfinite(a), ~torch.isfinite(b)), f"{what}: inf pattern differs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(5), ids=NAMES)
def test_nan_in_each_input_propagates_as_in_eager(index, device):
    inputs = list(make_inputs(SHAPES["primes"], torch.float64, device, seed=index))
    t = inputs[index].clone()
    t.view(-1)[t.numel() // 2] = float("nan")
    inputs[index] = t
    (f, grads), (f_ref, grads_ref) = both(inputs)
    same_nonfinite_pattern(f, f_ref, "f")
    assert torch.isnan(f).any()
    for name, g, r in zip(NAMES, grads, grads_ref):
        same_nonfinite_pattern(g, r, "d" + name)
        finite = torch.isfinite(r)
        assert torch.allclose(g[finite], r[finite], rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("unit", [0, 5, 7])
def test_infinite_unit_gives_inf_in_the_quadratic_form(unit):
    # Positive inputs and +inf in one unit: f = +inf as in eager. The narrow
    # float32 kernels' f = rᵀ Q r (q not saved) summed each unit's row of Q's
    # upper triangle from its tile's first column: 0 · inf = NaN.
    z, W, V, B, A = (t.abs() + 0.1 for t in make_inputs(((9,), 5, 8, 6, 7), torch.float32, seed=6))
    W = W.clone()
    W[unit, 0] = float("inf")
    with torch.no_grad():
        f = torchext.two_layer_square(z, W, V, B, A, plan="quadratic")
    want = torchext.reference.two_layer_square(*(t.double() for t in (z, W, V, B, A)))
    assert torch.equal(torch.isposinf(f), torch.isposinf(want)) and torch.isposinf(want).all()


@pytest.mark.parametrize("route", ["direct", "folded", "quadratic", "aten-direct", "aten-quadratic"])
@pytest.mark.parametrize("w", [-1.0, 0.5], ids=["dead-unit", "live-unit"])
def test_incoming_gradient_near_the_float32_limit(route, w):
    # g a = 2.25e38 is finite and so is (g a) y, but 2 g a is not: the chains
    # doubled first, giving inf, and NaN (inf · 0) where the unit is dead and
    # every gradient is 0. Eager's y * y differentiates as (g a) y + (g a) y.
    plan = route.split("-")[-1]
    forward, backward = ((TESTING._two_layer_square_forward_aten, TESTING._two_layer_square_backward_aten)
                         if route.startswith("aten") else
                         (torch.ops.torchext._two_layer_square_forward, torch.ops.torchext._two_layer_square_backward))
    z, W, V, B, A = (torch.tensor([[v]]) for v in (1.0, w, 1.0, 1.0, 0.75))
    g = torch.tensor([3e38])
    with torch.no_grad():
        f, r, q, state = forward(z, W, V, B, A, plan, True)
        got = backward(g, z, W, V, B, A, r, q, state, [True] * 5)
    _, _, want = reference_outputs((z, W, V, B, A), g=g)
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(a).all(), (name, a)
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=0, msg=name)


@pytest.mark.parametrize("face", ["functional", "Function"])
def test_incoming_gradient_near_the_float32_limit_in_double_backward(face):
    # As above, through the double backward's torch ops (create_graph): with
    # y = 0.01, dz and its derivatives in W, A and g are finite where 2 g is not.
    fn = torchext.two_layer_square if face == "functional" else torchext.TwoLayerSquare.apply
    values = [torch.tensor([[v]]) for v in (1.0, 0.01, 1.0, 1.0, 0.75)] + [torch.tensor([3e38])]
    results = []
    for f_of, dtype in ((fn, torch.float32), (torchext.reference.two_layer_square, torch.float64)):
        z, W, V, B, A, g = (t.to(dtype).requires_grad_(i in (0, 1, 4, 5)) for i, t in enumerate(values))
        (gz,) = torch.autograd.grad(f_of(z, W, V, B, A), z, g, create_graph=True)
        results.append((gz, *torch.autograd.grad(gz.sum(), (W, A, g))))
    for name, got, want in zip(("dz", "d(dz)/dW", "d(dz)/dA", "d(dz)/dg"), *results):
        assert torch.isfinite(got).all(), (name, got)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0, msg=name)


def test_half_inputs_forward_mode_and_second_order_in_float32():
    # V r = 65536 overflows float16 (y = 64 and f = 2048 do not): computed
    # in the inputs' dtype, jvp, jacfwd, hessian and the double backward gave
    # NaN where f and the first-order gradient are exact.
    dtype = torch.float16
    z, W, V, B, A = (torch.tensor([[v]], dtype=dtype) for v in (256.0, 1.0, 256.0, 2.0 ** -10, 0.5))
    F = lambda w: torchext.two_layer_square(z, w, V, B, A)  # noqa: E731
    want = torch.tensor([[4096.0]], dtype=dtype)  # df/dW, and d²f/dW² (f = 2048 W² here)
    assert F(W).item() == 2048.0
    assert torch.func.jvp(F, (W,), (torch.ones_like(W),))[1].item() == 4096.0
    torch.testing.assert_close(torch.func.jacfwd(F)(W).reshape(1, 1), want, rtol=0, atol=0)
    torch.testing.assert_close(torch.func.hessian(lambda w: F(w).sum())(W).reshape(1, 1), want, rtol=0, atol=0)
    Wr = W.clone().requires_grad_()
    (gW,) = torch.autograd.grad(F(Wr).sum(), Wr, create_graph=True)
    assert gW.dtype == dtype and gW.item() == 4096.0
    (ggW,) = torch.autograd.grad(gW.sum(), Wr)
    assert ggW.dtype == dtype and ggW.item() == 4096.0


@pytest.mark.parametrize("plan", ["direct", "folded", "quadratic"])
def test_quadratic_form_of_a_finite_q_near_the_float32_limit(plan):
    # Q = Mᵀ diag(a) M = s² everywhere, finite, but Q_ij + Q_ji is not: the
    # narrow float32 kernels' f = rᵀ Q r (q not saved) summed those pairs
    # and gave [nan, inf] where every other route gives f finite.
    s = 1.4e19
    z = torch.tensor([[1.0, -1.0], [1.0, 1e-3], [0.5, 0.25]])
    W, V, B, A = torch.eye(2), torch.eye(2), torch.tensor([[s, s]]), torch.tensor([[1.0]])
    with torch.no_grad():
        f = torchext.two_layer_square(z, W, V, B, A, plan=plan)
    want = torchext.reference.two_layer_square(*(t.double() for t in (z, W, V, B, A)))
    assert torch.isfinite(f).all(), f
    torch.testing.assert_close(f.double(), want, rtol=1e-5, atol=0)


def test_quadratic_form_of_a_subnormal_q_keeps_its_bits():
    # Q = a = 2^-130 + 2^-149, subnormal: halving it (as the narrow kernels
    # do where Q_ij + Q_ji overflows) would drop its last bit and move f.
    z, W, V, B = torch.tensor([[2.0 ** 40]]), torch.eye(1), torch.eye(1), torch.eye(1)
    A = torch.tensor([[2.0 ** -130 + 2.0 ** -149]])
    with torch.no_grad():
        fs = [torchext.two_layer_square(z, W, V, B, A, plan=p) for p in ("direct", "folded", "quadratic")]
    assert fs[0].item() == (2.0 ** -130 + 2.0 ** -149) * 2.0 ** 80
    assert all(torch.equal(f, fs[0]) for f in fs), fs


@pytest.mark.parametrize("n", [1, 129, 300])
@pytest.mark.parametrize("saved", [False, True], ids=["recomputed", "saved"])
def test_infinite_weight_of_an_inactive_unit_in_a_partial_block(n, saved):
    # A -inf weight on a unit inactive in every sample: f and the gradients are
    # finite (dW's row for the unit is 0). The narrow float32 kernels pad a
    # block of samples with z = 0, where that unit's x is -inf · 0 = NaN: the
    # padding must not reach dW or the Gram (it made them NaN) whether r is
    # recomputed (d + k < 64) or saved.
    d, k = (16, 17) if not saved else (40, 30)
    z, W, V, B, A = make_inputs(((n,), d, k, 16, 64), torch.float32, seed=5)
    z = z.abs() + 0.1
    W = W.clone()
    W[0, 0] = -float("inf")
    leaves = [t.clone().requires_grad_() for t in (z, W, V, B, A)]
    f = torchext.two_layer_square(*leaves, plan="quadratic")
    grads = torch.autograd.grad(f.sum(), leaves[1:])
    ref_leaves = [t.double().requires_grad_() for t in (z, W, V, B, A)]
    f_ref = torchext.reference.two_layer_square(*ref_leaves)
    grads_ref = torch.autograd.grad(f_ref.sum(), ref_leaves[1:])
    assert torch.isfinite(f).all()
    assert_matches(f, f_ref, torch.float32, "f")
    for name, g, r in zip(NAMES[1:], grads, grads_ref):
        assert torch.isfinite(r).all() and torch.isfinite(g).all(), "d" + name
        assert_matches(g, r, torch.float32, "d" + name)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_where_relu_is_inactive(device):
    # A NaN upstream of an inactive unit must not leak through ReLU's derivative:
    # torch uses a select there, not a multiplication by 0.
    z, W, V, B, A = make_inputs(SHAPES["small"], torch.float64, device, seed=1)
    W = W.clone()
    W[0] = -W[0].abs()
    z = z.abs()  # unit 0 inactive in every sample (x < 0), by construction
    assert ((z @ W.T)[:, 0] < 0).all()
    V = V.clone()
    V[0, 0] = float("nan")  # reaches unit 0 only through the backward's Vᵀ(...)
    (f, grads), (f_ref, grads_ref) = both([z, W, V, B, A])
    for name, g, r in zip(NAMES, grads, grads_ref):
        same_nonfinite_pattern(g, r, "d" + name)
        finite = torch.isfinite(r)
        assert_matches(g[finite], r[finite], torch.float64, "d" + name)
    assert torch.isfinite(grads[1][0]).all()  # dW's row of the inactive unit: 0, not NaN


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(5), ids=NAMES)
def test_infinity_gives_nonfinite_where_eager_does(index, device):
    inputs = list(make_inputs(SHAPES["primes"], torch.float64, device, seed=10 + index))
    t = inputs[index].clone()
    t.view(-1)[0] = float("inf")
    inputs[index] = t
    (f, grads), (f_ref, grads_ref) = both(inputs)
    assert not torch.isfinite(f_ref).all()  # the case is what it says, whatever the seed
    for name, got, ref in zip(("f",) + NAMES, (f,) + grads, (f_ref,) + grads_ref):
        same_nonfinite_pattern(got, ref, name)
        finite = torch.isfinite(ref)
        assert_matches(got[finite], ref[finite], torch.float64, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_batch(dtype, device):
    z, W, V, B, A = [t.requires_grad_() for t in make_inputs(SHAPES["empty-batch"], dtype, device)]
    f = torchext.two_layer_square(z, W, V, B, A)
    assert f.shape == (0,) and f.dtype == dtype
    grads = torch.autograd.grad(f.sum(), [z, W, V, B, A])
    assert grads[0].shape == (0, 5)
    for g, t in zip(grads[1:], (W, V, B, A)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t))
    z3 = torch.zeros(3, 0, 5, dtype=dtype, device=device)
    assert torchext.two_layer_square(z3, W, V, B, A).shape == (3, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("widths", [(4, 0, 3, 2), (4, 3, 0, 2), (4, 3, 2, 0), (0, 3, 2, 2), (0, 0, 0, 0)], ids=str)
def test_zero_widths_give_exact_zeros(widths, device):
    d, k, m, ell = widths
    inputs = make_inputs(((6,), d, k, m, ell), torch.float64, device, seed=3)
    (f, grads), (f_ref, grads_ref) = both(inputs)
    assert_matches(f, f_ref, torch.float64, "f")
    for name, g, r, t in zip(NAMES, grads, grads_ref, inputs):
        assert g.shape == t.shape
        assert_matches(g, r, torch.float64, "d" + name)


def test_vector_z_gives_0_dim_f():
    inputs = [t.requires_grad_() for t in make_inputs(SHAPES["vector"], torch.float64)]
    f = torchext.two_layer_square(*inputs)
    assert f.dim() == 0
    leaves = [t.detach().requires_grad_() for t in inputs]
    f_ref = torchext.reference.two_layer_square(*leaves)
    assert_matches(f, f_ref, torch.float64, "f")
    for name, g, r in zip(NAMES, torch.autograd.grad(f, inputs), torch.autograd.grad(f_ref, leaves)):
        assert g.shape == r.shape
        assert_matches(g, r, torch.float64, "d" + name)


def test_inference_mode_and_no_grad():
    inputs = make_inputs(SHAPES["many-chunks"], torch.float32)
    expected = torchext.two_layer_square(*inputs)
    with torch.no_grad():
        assert torch.equal(torchext.two_layer_square(*inputs), expected)
    with torch.inference_mode():
        assert torch.equal(torchext.two_layer_square(*inputs), expected)


@pytest.mark.parametrize("face", ["functional", "Function", "raw-op", "module"])
def test_autocast_cpu_bfloat16(face):
    # Low-precision z with float32 weights under autocast: no dtype error, f in
    # float32, gradients in each input's own dtype.
    torch.manual_seed(0)
    z, W, V, B, A = make_inputs(SHAPES["primes"], torch.float32, seed=12)
    z = z.to(torch.bfloat16).requires_grad_()
    W.requires_grad_()
    V.requires_grad_()
    net = torchext.TwoLayerSquareNet(11, 7, 5, 3, A=A, B=B)
    with torch.no_grad():
        net.W.copy_(W)
        net.V.copy_(V)
    fns = {
        "functional": lambda: torchext.two_layer_square(z, W, V, B, A),
        "Function": lambda: torchext.TwoLayerSquare.apply(z, W, V, B, A),
        "raw-op": lambda: torch.ops.torchext.two_layer_square(z, W, V, B, A),
        "module": lambda: net(z),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = fns[face]()
    assert f.dtype == torch.float32
    f.sum().backward()
    weights = (net.W, net.V) if face == "module" else (W, V)
    assert z.grad.dtype == torch.bfloat16 and all(w.grad.dtype == torch.float32 for w in weights)
    leaves = [t.detach().double().requires_grad_() for t in (z, W, V)]
    ref = torchext.reference.two_layer_square(leaves[0], leaves[1], leaves[2], B.double(), A.double())
    ref.sum().backward()
    assert ((f.double() - ref).norm() / ref.norm()).item() < 1e-5
    for got, want in zip((z.grad,) + tuple(w.grad for w in weights), leaves):
        tol = 1e-2 if got.dtype == torch.bfloat16 else 1e-5
        assert ((got.double() - want.grad).norm() / want.grad.norm()).item() < tol


@pytest.mark.parametrize("face", ["functional", "Function", "raw-op"])
def test_gradient_penalty_under_autocast_with_half_inputs(face):
    # Every input bfloat16: f (and so the incoming gradient) comes back
    # float32, and the double backward of a gradient penalty must bring both
    # to one dtype, as the eager composition does.
    fns = {"functional": torchext.two_layer_square, "Function": torchext.TwoLayerSquare.apply,
           "raw-op": torch.ops.torchext.two_layer_square}
    results = []
    for fn in (fns[face], torchext.reference.two_layer_square):
        inputs = [t.to(torch.bfloat16) for t in make_inputs(SHAPES["primes"], torch.float32, seed=13)]
        z, W, V, B, A = [t.requires_grad_(i < 4) for i, t in enumerate(inputs)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f = fn(z, W, V, B, A)
        (gz,) = torch.autograd.grad(f.sum(), z, create_graph=True)
        gz.float().square().sum().backward()
        results.append([t.grad for t in (z, W, V, B)])
    for name, got, want in zip(NAMES, *results):
        assert got.dtype == torch.bfloat16
        assert ((got.double() - want.double()).norm() / want.double().norm()).item() < 3e-2, name


@pytest.mark.parametrize("save", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("d,k", [(6, 5), (6, 13), (56, 13)], ids=["k5", "k13", "k13-saved"])
def test_infinite_z_with_k_not_a_multiple_of_8(d, k, save):
    # The narrow float32 kernels pad k to a multiple of 8 with zero rows of W:
    # a padded unit must stay 0 (not 0 · inf = NaN) when z holds ±inf, so a
    # sample whose units are all inactive gives f = 0, as in eager (d + k >= 64:
    # the backward reads saved r and q). On a CPU without the narrow kernels
    # this checks the BLAS path the same way.
    z, W, V, B, A = make_inputs(((40,), d, k, 4, 3), torch.float32, seed=14)
    W = W.abs()
    z[0, 0] = -float("inf")  # every unit of sample 0: x = -inf, r = 0
    z[1, 2] = float("inf")
    inputs = [t.requires_grad_(save) for t in (z, W, V, B, A)]
    f = torchext.two_layer_square(*inputs, plan="quadratic")
    f_ref = torchext.reference.two_layer_square(*[t.detach() for t in inputs])
    assert f[0].item() == 0.0 and f_ref[0].item() == 0.0
    same_nonfinite_pattern(f, f_ref, "f")
    finite = torch.isfinite(f_ref)
    assert_matches(f[finite], f_ref[finite], torch.float32, "f")
    if save:
        grads = torch.autograd.grad(f.sum(), inputs)
        leaves = [t.detach().requires_grad_() for t in inputs]
        grads_ref = torch.autograd.grad(torchext.reference.two_layer_square(*leaves).sum(), leaves)
        for name, g, gr in zip(NAMES, grads, grads_ref):
            same_nonfinite_pattern(g, gr, f"d{name}")


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("index", range(5), ids=NAMES)
@pytest.mark.parametrize("case", cases(shapes=("primes", "narrow-odd-k", "saved"), dtypes=(torch.float32, torch.float64)))
def test_special_value_in_each_input_on_every_plan(case, index, special):
    # One element of one input set to NaN or ±inf: f and every gradient are
    # non-finite exactly where eager's are, and equal elsewhere. The direct
    # plan keeps eager's association, so its NaN and ±inf sit exactly where
    # eager's do; the folded and quadratic plans add an infinite weight into
    # M = B V or Q = Mᵀ diag(a) M first, where inf − inf can make NaN of what
    # eager leaves ±inf.
    inputs = case.inputs()
    t = inputs[index].clone()
    t.view(-1)[t.numel() // 2] = special
    inputs[index] = t
    leaves = [x.detach().requires_grad_() for x in inputs]
    f = torchext.two_layer_square(*leaves, plan=case.plan)
    grads = torch.autograd.grad(f.sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in inputs]
    f_ref = torchext.reference.two_layer_square(*ref_leaves)
    grads_ref = torch.autograd.grad(f_ref.sum(), ref_leaves)
    for name, got, ref in zip(("f",) + NAMES, (f,) + grads, (f_ref,) + grads_ref):
        got = got.detach().double()
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite pattern differs"
        if case.plan == "direct" or special != special:
            assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{name}: NaN pattern differs"
            assert torch.equal(torch.isposinf(got), torch.isposinf(ref)), f"{name}: +inf pattern differs"
        if finite.any():
            assert_matches(got[finite], ref[finite], case.dtype if case.dtype == torch.float64 else torch.float32, name)
