"""Every batching rule (torch.func.vmap over each input, nested; per-sample
gradients through each face; jacrev, hessian, is_grads_batched) against a
per-member loop over the float64 eager reference.

The shapes are chosen so that one forward over all members' samples and one
member's backward resolve "auto" to different plans, with r and q saved
(d + k >= 64): the plan must travel from the forward to every per-member
backward (a backward that re-resolved it read the folded plan's q as the
direct plan's y)."""
import pytest
import torch

import torchext
from conftest import assert_matches, make_inputs, python_calls_in_torchext
from torchext.testing import load_testing_ops

TESTING = load_testing_ops()  # torch.ops.torchext_testing

OPS = torch.ops.torchext
ref_fn = torchext.reference.two_layer_square

# (members, samples per member, d, k, m, ell) -> (plan of all members' samples, plan of one member's)
PLAN_PAIRS = {
    "folded-vs-direct": ((12, 20, 3, 61, 64, 3), ("folded", "direct")),
    "quadratic-vs-direct": ((5, 20, 3, 61, 128, 100), ("quadratic", "direct")),
    "quadratic-vs-folded": ((2, 200, 3, 61, 128, 40), ("quadratic", "folded")),
}
PAIRS = list(PLAN_PAIRS)


def pair_inputs(pair, seed):
    (members, rows, d, k, m, ell), plans = PLAN_PAIRS[pair]
    assert d + k >= 64  # r and q are saved
    assert (TESTING._plan(members * rows, d, k, m, ell), TESTING._plan(rows, d, k, m, ell)) == plans
    z, W, V, B, A = make_inputs(((members, rows), d, k, m, ell), torch.float64, seed=seed)
    return z, W, V, B, A


def batched(t, members, seed):
    """`members` different copies of t, stacked along dim 0."""
    g = torch.Generator().manual_seed(seed)
    return t + 0.3 * torch.randn((members, *t.shape), generator=g, dtype=t.dtype) * t.std()


def faces(W, V, B, A):
    """name -> fn(z, W, V, B, A) for the functional form, the Function and the
    Module (through torch.func.functional_call)."""
    net = torchext.TwoLayerSquareNet(W.shape[1], W.shape[0], V.shape[0], B.shape[0], A=A, B=B,
                                     trainable_AB=True, dtype=torch.float64)

    def module(z, W, V, B, A):
        return torch.func.functional_call(net, {"W": W, "V": V, "B": B, "A": A}, (z,))

    return {"functional": torchext.two_layer_square, "Function": torchext.TwoLayerSquare.apply,
            "Module": module}


def per_member(fn, args, in_dims):
    """fn over each member of the batched arguments, stacked (the loop vmap replaces)."""
    members = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    outs = [fn(*[a if d is None else a.select(d, i) for a, d in zip(args, in_dims)]) for i in range(members)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


def loss_of(fn):
    return lambda *args: fn(*args).sum()


@pytest.mark.parametrize("face", ["functional", "Function", "Module"])
@pytest.mark.parametrize("pair", PAIRS)
def test_per_sample_gradients(pair, face):
    # vmap(grad) over z alone: one forward over every member's samples.
    z, W, V, B, A = pair_inputs(pair, seed=1)
    fn = faces(W, V, B, A)[face]
    in_dims = (0, None, None, None, None)
    got = torch.func.vmap(torch.func.grad(loss_of(fn), argnums=(0, 1, 2, 3, 4)), in_dims)(z, W, V, B, A)
    want = per_member(torch.func.grad(loss_of(ref_fn), argnums=(0, 1, 2, 3, 4)), (z, W, V, B, A), in_dims)
    for name, g, w in zip("zWVBA", got, want):
        assert_matches(g, w, torch.float64, f"d{name}")


@pytest.mark.parametrize("batched_input", [0, 1, 2, 3, 4], ids=list("zWVBA"))
@pytest.mark.parametrize("pair", PAIRS)
def test_vmap_over_each_input(pair, batched_input):
    # f and every gradient, with one input batched (the others shared).
    z, W, V, B, A = pair_inputs(pair, seed=2)
    members = z.shape[0]
    args = [z, W, V, B, A]
    if batched_input != 0:
        args[0] = z[0]  # the samples of one member, shared
        args[batched_input] = batched(args[batched_input], members, seed=3)
    in_dims = tuple(0 if i == batched_input else None for i in range(5))
    f = torch.func.vmap(torchext.two_layer_square, in_dims)(*args)
    assert_matches(f, per_member(ref_fn, args, in_dims), torch.float64, "f")
    grad = torch.func.grad(loss_of(torchext.two_layer_square), argnums=(0, 1, 2, 3, 4))
    grad_ref = torch.func.grad(loss_of(ref_fn), argnums=(0, 1, 2, 3, 4))
    got = torch.func.vmap(grad, in_dims)(*args)
    for name, g, w in zip("zWVBA", got, per_member(grad_ref, args, in_dims)):
        assert_matches(g, w, torch.float64, f"d{name}")


@pytest.mark.parametrize("pair", ["folded-vs-direct", "quadratic-vs-folded"])
def test_nested_vmap(pair):
    # Outer vmap over an ensemble of W, inner over z's members.
    z, W, V, B, A = pair_inputs(pair, seed=4)
    Ws = batched(W, 3, seed=5)
    grad = torch.func.grad(loss_of(torchext.two_layer_square), argnums=(1, 2))
    grad_ref = torch.func.grad(loss_of(ref_fn), argnums=(1, 2))
    inner = (0, None, None, None, None)
    outer = (None, 0, None, None, None)
    got = torch.func.vmap(torch.func.vmap(grad, inner), outer)(z, Ws, V, B, A)
    want = per_member(lambda *a: per_member(grad_ref, a, inner), (z, Ws, V, B, A), outer)
    for name, g, w in zip("WV", got, want):
        assert_matches(g, w, torch.float64, f"d{name}")


@pytest.mark.parametrize("pair", PAIRS)
def test_jacrev_per_member(pair):
    # Each member's Jacobian of its f (one value per sample) with respect to W.
    z, W, V, B, A = pair_inputs(pair, seed=6)
    z = z[:, :7]  # Jacobians are rows × k × d
    in_dims = (0, None, None, None, None)
    jac = torch.func.jacrev(torchext.two_layer_square, argnums=1)
    jac_ref = torch.func.jacrev(ref_fn, argnums=1)
    got = torch.func.vmap(jac, in_dims)(z, W, V, B, A)
    assert_matches(got, per_member(jac_ref, (z, W, V, B, A), in_dims), torch.float64, "jacobian")


@pytest.mark.parametrize("pair", PAIRS)
def test_hessian_per_member(pair):
    # Forward-over-reverse under vmap: the backward's jvp with the saved state.
    z, W, V, B, A = pair_inputs(pair, seed=7)

    def hess(fn):
        return torch.func.hessian(lambda z: fn(z, W, V, B, A).sum())

    got = torch.func.vmap(hess(torchext.two_layer_square))(z[:, :10])
    want = torch.stack([hess(ref_fn)(zi) for zi in z[:, :10]])
    assert_matches(got, want, torch.float64, "hessian")


@pytest.mark.parametrize("face", ["functional", "Function", "Module"])
def test_is_grads_batched_per_sample(face):
    # The legacy vmap of autograd.grad(is_grads_batched=True): one row of the
    # Jacobian of f with respect to V per sample, with r and q saved.
    z, W, V, B, A = make_inputs(((9,), 5, 61, 7, 3), torch.float64, seed=8)
    V = V.requires_grad_()
    f = faces(W, V, B, A)[face](z, W, V, B, A)
    rows = torch.eye(9, dtype=torch.float64)
    (got,) = torch.autograd.grad(f, V, rows, is_grads_batched=True)
    want = torch.func.jacrev(ref_fn, argnums=2)(z, W, V.detach(), B, A)
    assert_matches(got, want, torch.float64, "jacobian rows")


@pytest.mark.parametrize("batched_input", [0, 1], ids=["z", "W"])
def test_vmap_over_an_empty_batch(batched_input):
    z, W, V, B, A = make_inputs(((4,), 5, 61, 7, 3), torch.float64, seed=9)
    args = [z, W, V, B, A]
    args[batched_input] = args[batched_input].unsqueeze(0)[:0]
    in_dims = tuple(0 if i == batched_input else None for i in range(5))
    f = torch.func.vmap(torchext.two_layer_square, in_dims)(*args)
    assert f.shape == torch.func.vmap(ref_fn, in_dims)(*args).shape
    grads = torch.func.vmap(torch.func.grad(loss_of(torchext.two_layer_square), argnums=(0, 1)), in_dims)(*args)
    want = torch.func.vmap(torch.func.grad(loss_of(ref_fn), argnums=(0, 1)), in_dims)(*args)
    assert [g.shape for g in grads] == [w.shape for w in want]


def test_backward_runs_the_plan_its_forward_ran():
    # The state says which plan wrote r and q; the backward reads it, and
    # refuses r and q that do not fit it.
    z, W, V, B, A = make_inputs(((40,), 3, 61, 64, 3), torch.float64, seed=10)
    g = torch.ones(40, dtype=torch.float64)
    for plan in ("direct", "folded", "quadratic"):
        f, r, q, state = OPS._two_layer_square_forward(z, W, V, B, A, plan, True)
        assert state.numel() == 0 and state.shape == (0, ("direct", "folded", "quadratic").index(plan), 1)
        _, _, _, auto_state = OPS._two_layer_square_forward(z, W, V, B, A, "auto", True)
        assert auto_state.shape == (0, ("direct", "folded", "quadratic").index(TESTING._plan(40, 3, 61, 64, 3)), 1)
        with pytest.raises(ValueError, match="saved r must have shape"):
            OPS._two_layer_square_backward(g[:20], z[:20], W, V, B, A, r, q, state, [True] * 5)
        # The Meta kernel (fake tensors, torch.compile) refuses them too.
        meta = [t.to("meta") for t in (g, z, W, V, B, A, r, q, state)]
        with pytest.raises(ValueError, match="saved q must have shape"):
            OPS._two_layer_square_backward(*meta[:7], meta[7][:, :2], meta[8], [True] * 5)
        with pytest.raises(ValueError, match="state must be"):
            OPS._two_layer_square_backward(g, z, W, V, B, A, r, q, torch.empty(0, 5, 1), [True] * 5)
    # Saved, yet under the unresolved "auto": no forward makes such a state.
    for device in ("cpu", "meta"):
        args = [t.to(device) for t in (g, z, W, V, B, A, r, q)]
        with pytest.raises(ValueError, match="unresolved plan"):
            OPS._two_layer_square_backward(*args, torch.empty(0, 3, 1, device=device), [True] * 5)


@pytest.mark.parametrize("face", ["functional", "Function", "Module"])
@pytest.mark.parametrize("pair", PAIRS)
def test_backward_of_a_vmap_over_samples_is_one_fused_call(pair, face):
    # vmap(f)(z).sum().backward() (and so grad(vmap(f))): the vmapped dimension
    # is just more samples, so one backward call serves every member — a
    # backward run under vmap, once per member, would cost members× as much —
    # and the gradients are those of the flat batch.
    z, W, V, B, A = pair_inputs(pair, seed=31)
    leaves = [t.clone().requires_grad_() for t in (W, V, B, A)]
    fn = faces(W, V, B, A)[face]
    calls = python_calls_in_torchext(
        lambda: torch.func.vmap(fn, in_dims=(0, None, None, None, None))(z, *leaves).sum().backward())
    assert calls.count("call_backward") == 1 and "per_member" not in calls, calls
    ref_leaves = [t.detach().clone().requires_grad_() for t in (W, V, B, A)]
    ref_fn(z, *ref_leaves).sum().backward()
    for name, got, want in zip("WVBA", leaves, ref_leaves):
        assert_matches(got.grad, want.grad, torch.float64, f"d{name}")
