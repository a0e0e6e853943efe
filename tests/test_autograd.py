"""gradcheck / gradgradcheck / opcheck / torch.compile / torch.func on the two faces."""
import functools

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import torchext
from cases import PLANS, Case, cases
from conftest import DEVICES, SHAPES, assert_matches, make_inputs

OPS = torch.ops.torchext


def away_from_kink(shape, device="cpu", seed=0, margin=1e-2):
    """float64 inputs whose pre-activations W z all stay |x| > margin, so finite
    differences never straddle the ReLU kink."""
    for s in range(seed, seed + 1000):
        z, W, V, B, A = make_inputs(shape, torch.float64, device, seed=s)
        if (z @ W.T).abs().min() > margin:
            return [t.requires_grad_() for t in (z, W, V, B, A)]
    raise AssertionError("no kink-free inputs found")


FACES = {
    "Function": lambda *a: torchext.TwoLayerSquare.apply(*a),
    "raw-op": OPS.two_layer_square,
    # plain eager: the C++ autograd node (create_graph goes through the ops' autograd)
    "functional": torchext.two_layer_square,
    **{f"functional-{plan}": functools.partial(torchext.two_layer_square, plan=plan) for plan in PLANS[1:]},
}
# d + k >= 64: the planned forward saves r and q, which its backward reads.
SAVED_SMALL = ((3,), 50, 14, 3, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("face", list(FACES))
@pytest.mark.parametrize("shape", ["small", "vector", "two-leading", "saved"])
def test_gradcheck_and_gradgradcheck(face, shape, device):
    inputs = away_from_kink(SAVED_SMALL if shape == "saved" else SHAPES[shape], device)
    fn = FACES[face]
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_with_vector_A(device):
    z, W, V, B, A = away_from_kink(SHAPES["primes"], device, seed=40)
    A = A.detach().reshape(-1).requires_grad_()
    assert gradcheck(torchext.two_layer_square, (z, W, V, B, A))
    assert gradgradcheck(torchext.two_layer_square, (z, W, V, B, A))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_gradcheck(device):
    # The backward op on its own, including the incoming gradient.
    z, W, V, B, A = away_from_kink(SHAPES["small"], device, seed=60)
    g = torch.randn(5, dtype=torch.float64, device=device, requires_grad=True)
    mask = [True, True, False, True, True]

    def bwd(g, z, W, V, B, A):
        return tuple(o for o in OPS.two_layer_square_backward(g, z, W, V, B, A, mask) if o is not None)

    assert gradcheck(bwd, (g, z, W, V, B, A))


@pytest.mark.parametrize("device", DEVICES)
def test_exact_kink_matches_eager(device):
    # Pre-activations exactly 0: ReLU's derivative there is 0, as in torch.relu.
    z, W, V, B, A = make_inputs(SHAPES["primes"], torch.float64, device, seed=3)
    W[2].zero_()
    W[4, :] = 0
    z[:, 0] = 0
    W[5, 1:] = 0  # x_5 = W[5,0] z_0 = 0 exactly
    inputs = [t.requires_grad_() for t in (z, W, V, B, A)]
    f = torchext.two_layer_square(*inputs)
    grads = torch.autograd.grad(f.sum(), inputs)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    f_ref = torchext.reference.two_layer_square(*leaves)
    grads_ref = torch.autograd.grad(f_ref.sum(), leaves)
    assert ((z @ W.T) == 0).any()
    assert_matches(f, f_ref, torch.float64)
    for g, r in zip(grads, grads_ref):
        assert_matches(g, r, torch.float64)


def _opcheck_cases(device):
    for dtype in (torch.float32, torch.float64):
        for requires_grad in (False, True):
            for transposed in (False, True):
                z, W, V, B, A = make_inputs(SHAPES["primes"], dtype, device, seed=8)
                if transposed:
                    z = z.T.contiguous().T
                    W = W.T.contiguous().T
                    B = B.T.contiguous().T
                yield [t.requires_grad_(requires_grad) for t in (z, W, V, B, A)]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward(device):
    for args in _opcheck_cases(device):
        torch.library.opcheck(OPS.two_layer_square.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device):
    for args in _opcheck_cases(device):
        g = torch.randn(args[0].shape[:-1], dtype=args[0].dtype, device=device, requires_grad=args[0].requires_grad)
        for mask in ([True] * 5, [False, True, True, False, False]):
            torch.library.opcheck(OPS.two_layer_square_backward.default, [g, *args, mask])


def _internal_opcheck_cases(device):
    """The internal ops' samples: every plan and "auto", saved (d + k >= 64)
    and recomputed state, an empty batch, and a broadcast incoming gradient."""
    for shape in (SHAPES["primes"], SAVED_SMALL, SHAPES["empty-batch"]):
        for plan in PLANS:
            z, W, V, B, A = make_inputs(shape, torch.float64, device, seed=9)
            for save in (False, True):
                yield (z, W, V, B, A), plan, save


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_internal_ops(device):
    for inputs, plan, save in _internal_opcheck_cases(device):
        torch.library.opcheck(OPS._two_layer_square_forward.default, [*inputs, plan, save])
        f, *state = OPS._two_layer_square_forward(*inputs, plan, save)
        for g in (torch.randn(f.shape, dtype=f.dtype, device=device), torch.ones((), dtype=f.dtype, device=device).expand(f.shape)):
            for mask in ([True] * 5, [False, True, True, False, True]):
                torch.library.opcheck(OPS._two_layer_square_backward.default, [g, *inputs, *state, mask])


def test_compile_fullgraph_module_forward_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torchext.TwoLayerSquareNet(8, 6, 5, 4, dtype=torch.float64)
    z = torch.randn(33, 8, dtype=torch.float64)
    compiled = torch.compile(net, fullgraph=True)
    f = compiled(z)
    grads = torch.autograd.grad(f.sum(), [net.W, net.V])
    f_ref = torchext.reference.two_layer_square(z, net.W, net.V, net.B, net.A)
    grads_ref = torch.autograd.grad(f_ref.sum(), [net.W, net.V])
    assert_matches(f, f_ref, torch.float64)
    for g, r in zip(grads, grads_ref):
        assert_matches(g, r, torch.float64)


@pytest.mark.parametrize("case", cases(shapes=("primes", "narrow-odd-k", "two-leading"), plans=PLANS))
def test_compile_fullgraph_functional_forward_backward(case):
    torch._dynamo.reset()
    inputs = case.inputs(requires_grad=True)
    compiled = torch.compile(functools.partial(torchext.two_layer_square, plan=case.plan), fullgraph=True)
    check_with_gradients(compiled, inputs)


def test_compile_fullgraph_function_forward_backward():
    torch._dynamo.reset()
    compiled = torch.compile(torchext.TwoLayerSquare.apply, fullgraph=True)
    check_with_gradients(compiled, Case("saved").inputs(requires_grad=True))


def check_with_gradients(fn, inputs):
    """fn's f and the gradients of f.sum() against the float64 reference."""
    f = fn(*inputs)
    grads = torch.autograd.grad(f.sum(), inputs)
    leaves = [t.detach().requires_grad_() for t in inputs]
    f_ref = torchext.reference.two_layer_square(*leaves)
    assert_matches(f, f_ref, torch.float64, "f")
    for name, g, r in zip("zWVBA", grads, torch.autograd.grad(f_ref.sum(), leaves)):
        assert_matches(g, r, torch.float64, f"d{name}")


@pytest.mark.parametrize("plan", PLANS)
def test_export_of_module(plan):
    net = torchext.TwoLayerSquareNet(8, 6, 5, 4, plan=plan, dtype=torch.float64)
    z = Case("primes", plan).inputs()[0][:, :1].expand(13, 8).contiguous() + torch.arange(8.0, dtype=torch.float64)
    ep = torch.export.export(net, (z,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    fused = [t for t in targets if t.startswith("torchext.")]
    assert fused == ["torchext.two_layer_square.default"] or fused == ["torchext._two_layer_square_forward.default"], targets
    assert not any("mm" in t or "relu" in t for t in targets), targets  # not decomposed
    for x in (z, torch.randn(13, 8, dtype=torch.float64)):
        assert_matches(ep.module()(x), torchext.reference.two_layer_square(x, net.W, net.V, net.B, net.A), torch.float64)


def make_face(face, W, V, B, A):
    """A public face as a function of (z, W, V, B, A); the Module through
    torch.func.functional_call (built here, outside any transform)."""
    if face == "functional":
        return torchext.two_layer_square
    if face == "Function":
        return lambda *a: torchext.TwoLayerSquare.apply(*a)
    net = torchext.TwoLayerSquareNet(W.shape[1], W.shape[0], V.shape[0], B.shape[0], A=A, B=B, dtype=W.dtype)
    return lambda z, W, V, B, A: torch.func.functional_call(net, {"W": W, "V": V}, (z,))


FUNC_FACES = ["functional", "Function", "Module"]


@pytest.mark.parametrize("face", FUNC_FACES)
def test_torch_func_grad_and_hessian(face):
    z, W, V, B, A = [t.detach() for t in away_from_kink(SHAPES["small"], seed=70)]
    fn = make_face(face, W, V, B, A)

    def loss(W, V):
        return fn(z, W, V, B, A).sum()

    def loss_ref(W, V):
        return torchext.reference.two_layer_square(z, W, V, B, A).sum()

    for got, want in zip(torch.func.grad(loss, argnums=(0, 1))(W, V), torch.func.grad(loss_ref, argnums=(0, 1))(W, V)):
        assert_matches(got, want, torch.float64)
    H = torch.func.jacrev(torch.func.jacrev(loss, argnums=(0, 1)), argnums=(0, 1))(W, V)
    H_ref = torch.func.jacrev(torch.func.jacrev(loss_ref, argnums=(0, 1)), argnums=(0, 1))(W, V)
    for i in range(2):
        for j in range(2):
            assert_matches(H[i][j], H_ref[i][j], torch.float64, f"H[{i}][{j}]")


@pytest.mark.parametrize("face", FUNC_FACES)
def test_vmap_over_batch_and_weights(face):
    ref_fn = torchext.reference.two_layer_square
    z, W, V, B, A = make_inputs(((4, 5), 6, 3, 4, 2), torch.float64, seed=9)
    fn = make_face(face, W, V, B, A)
    out = torch.func.vmap(fn, in_dims=(0, None, None, None, None))(z, W, V, B, A)  # over z's batch
    assert_matches(out, ref_fn(z, W, V, B, A), torch.float64)
    out = torch.func.vmap(torch.func.vmap(fn, in_dims=(0, None, None, None, None)), in_dims=(0, None, None, None, None))(z, W, V, B, A)
    assert_matches(out, ref_fn(z, W, V, B, A), torch.float64)  # over an extra leading dim
    Ws = torch.stack([W, 2 * W, -W])
    out = torch.func.vmap(fn, in_dims=(None, 0, None, None, None))(z, Ws, V, B, A)  # ensemble over W
    assert_matches(out, torch.stack([ref_fn(z, w, V, B, A) for w in Ws]), torch.float64)
    Vs = torch.stack([V, 0.5 * V])
    out = torch.func.vmap(fn, in_dims=(None, None, 0, None, None))(z, W, Vs, B, A)  # ensemble over V
    assert_matches(out, torch.stack([ref_fn(z, W, v, B, A) for v in Vs]), torch.float64)


@pytest.mark.parametrize("face", FUNC_FACES)
def test_per_sample_gradients_are_not_summed(face):
    z, W, V, B, A = make_inputs(((5,), 6, 3, 4, 2), torch.float64, seed=10)
    fn = make_face(face, W, V, B, A)

    def f1(W, V, zi):
        return fn(zi, W, V, B, A)

    per = torch.func.vmap(torch.func.grad(f1, argnums=(0, 1)), in_dims=(None, None, 0))(W, V, z)
    for n in range(5):
        leaves = [W.clone().requires_grad_(), V.clone().requires_grad_()]
        ref = torch.autograd.grad(torchext.reference.two_layer_square(z[n], leaves[0], leaves[1], B, A), leaves)
        assert_matches(per[0][n], ref[0], torch.float64)
        assert_matches(per[1][n], ref[1], torch.float64)


def assert_compiled_module_matches(compiled, net, n):
    """f and dW of a compiled TwoLayerSquareNet(8, ...) equal eager's at batch n."""
    z = torch.randn(n, 8, dtype=torch.float64)
    f = compiled(z)
    (gW,) = torch.autograd.grad(f.sum(), [net.W])
    f_ref = torchext.reference.two_layer_square(z, net.W, net.V, net.B, net.A)
    (gW_ref,) = torch.autograd.grad(f_ref.sum(), [net.W])
    assert_matches(f, f_ref, torch.float64)
    assert_matches(gW, gW_ref, torch.float64)


def test_compile_dynamic_batch_uses_symbolic_meta_kernels():
    torch._dynamo.reset()
    net = torchext.TwoLayerSquareNet(8, 6, 5, 4, dtype=torch.float64)
    compiled = torch.compile(net, fullgraph=True, dynamic=True)
    for n in (5, 17, 33):
        assert_compiled_module_matches(compiled, net, n)


def test_forward_mode_on_the_function_raises_clearly():
    # TwoLayerSquare has no jvp (Dynamo could not trace it if it had): forward
    # mode through it is refused by PyTorch with a clear error, never wrong.
    z, W, V, B, A = make_inputs(SHAPES["small"], torch.float64)
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(lambda W: torchext.TwoLayerSquare.apply(z, W, V, B, A), (W,), (torch.ones_like(W),))


@pytest.mark.parametrize("plan", ["auto", "direct", "quadratic"])
def test_forward_mode_jvp_jacfwd_hessian(plan):
    def fn(*args):
        return torchext.two_layer_square(*args, plan=plan)

    z, W, V, B, A = [t.detach() for t in away_from_kink(SHAPES["small"], seed=80)]
    tangents = [torch.randn_like(t) for t in (z, W, V, B, A)]
    _, got = torch.func.jvp(fn, (z, W, V, B, A), tuple(tangents))
    _, want = torch.func.jvp(torchext.reference.two_layer_square, (z, W, V, B, A), tuple(tangents))
    assert_matches(got, want, torch.float64, "jvp")

    def loss(W, V):
        return fn(z, W, V, B, A).sum()

    def loss_ref(W, V):
        return torchext.reference.two_layer_square(z, W, V, B, A).sum()

    J = torch.func.jacfwd(lambda W: fn(z, W, V, B, A))(W)
    assert_matches(J, torch.func.jacfwd(lambda W: torchext.reference.two_layer_square(z, W, V, B, A))(W), torch.float64)
    H = torch.func.hessian(loss, argnums=(0, 1))(W, V)
    H_ref = torch.func.hessian(loss_ref, argnums=(0, 1))(W, V)
    for i in range(2):
        for j in range(2):
            assert_matches(H[i][j], H_ref[i][j], torch.float64, f"hessian[{i}][{j}]")


def test_forward_ad_dual_tensors_in_eager():
    import torch.autograd.forward_ad as fwAD

    z, W, V, B, A = make_inputs(SHAPES["primes"], torch.float64, seed=4)
    tW = torch.randn_like(W)
    with fwAD.dual_level():
        f = torchext.two_layer_square(z, fwAD.make_dual(W, tW), V, B, A)
        got = fwAD.unpack_dual(f).tangent
    _, want = torch.func.jvp(lambda W: torchext.reference.two_layer_square(z, W, V, B, A), (W,), (tW,))
    assert_matches(got, want, torch.float64)


def test_compile_max_autotune_no_cudagraphs():
    torch._dynamo.reset()
    net = torchext.TwoLayerSquareNet(8, 6, 5, 4, dtype=torch.float64)
    compiled = torch.compile(net, mode="max-autotune-no-cudagraphs", fullgraph=True)
    assert_compiled_module_matches(compiled, net, 21)


def test_mark_dynamic_batch_compiles_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    net = torchext.TwoLayerSquareNet(8, 6, 5, 4, dtype=torch.float64)
    compiled = torch.compile(net, backend=counter, fullgraph=True)
    for n in (2, 3, 17, 64, 1000):
        z = torch.randn(n, 8, dtype=torch.float64)
        torch._dynamo.mark_dynamic(z, 0)
        f = compiled(z)
        f.sum().backward()
        assert_matches(f, torchext.reference.two_layer_square(z, net.W, net.V, net.B, net.A), torch.float64)
    assert counter.frame_count == 1


CPP_NODE = "torch::autograd::CppNode<torchext::FusedTwoLayerSquare>"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", ["auto", "direct", "folded", "quadratic"])
@pytest.mark.parametrize("shape", ["vector", "primes", "wide"])
def test_plain_eager_is_one_cpp_node_matching_the_python_face(shape, plan, device):
    # The functional form records one C++ node in plain eager; it runs the same
    # ops as the Python face that torch.compile and torch.func use, so the
    # numbers agree bitwise, and both match the float64 reference.
    z, W, V, B, A = make_inputs(SHAPES[shape], torch.float32, device, seed=71)
    leaves = [t.clone().requires_grad_() for t in (z, W, V, B, A)]
    f = torchext.two_layer_square(*leaves, plan=plan)
    assert f.grad_fn.name() == CPP_NODE
    assert len(f.grad_fn.next_functions) == 5  # z, W, V, B, A
    f.backward(torch.randn_like(f), retain_graph=True)
    fast = [t.grad.clone() for t in leaves]

    twins = [t.clone().requires_grad_() for t in (z, W, V, B, A)]
    f_py = torchext.function.PlannedTwoLayerSquare.apply(*twins, plan, True)[0]
    assert f_py.grad_fn.name() != CPP_NODE
    torch.manual_seed(0)
    g = torch.randn_like(f)
    for t in leaves:
        t.grad = None
    f.backward(g)
    f_py.backward(g)
    assert torch.equal(f.detach(), f_py.detach())
    for name, a, b in zip("zWVBA", leaves, twins):
        assert torch.equal(a.grad, b.grad), name
    ref = [t.detach().double().requires_grad_() for t in (z, W, V, B, A)]
    torchext.reference.two_layer_square(*ref).backward(g.double())
    assert_matches(f, torchext.reference.two_layer_square(*[t.detach() for t in ref]), torch.float32)
    for name, a, b in zip("zWVBA", leaves, ref):
        assert_matches(a.grad, b.grad, torch.float32, name)
    assert all(a.shape == b.shape for a, b in zip(fast, leaves))


def test_plain_eager_without_grad_records_nothing():
    z, W, V, B, A = make_inputs(SHAPES["primes"], torch.float32, seed=72)
    with_grad = [t.requires_grad_() for t in (W, V)]
    with torch.no_grad():
        f = torchext.two_layer_square(z, *with_grad, B, A)
    assert f.grad_fn is None and not f.requires_grad
    assert torchext.two_layer_square(z, W.detach(), V.detach(), B, A).grad_fn is None
    assert torch.equal(f, torchext.two_layer_square(z, W, V, B, A).detach())


def test_plain_eager_node_guards_its_saved_inputs():
    z, W, V, B, A = make_inputs(SHAPES["primes"], torch.float32, seed=73)
    W.requires_grad_()
    Vc = V.clone()
    f = torchext.two_layer_square(z, W, Vc, B, A)
    Vc.mul_(2)  # modifies a saved input: autograd must refuse, not return stale grads
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        f.sum().backward()
    f = torchext.two_layer_square(z, W, V, B, A)
    f.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        f.sum().backward()


def test_plain_eager_node_under_anomaly_mode_and_hooks():
    z, W, V, B, A = make_inputs(SHAPES["primes"], torch.float64, seed=74)
    W.requires_grad_()
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.detect_anomaly(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f = torchext.two_layer_square(z, W, V, B, A)
        (gW,) = torch.autograd.grad(f.sum(), W)
    assert len(packed) == 8  # z, W, V, B, A, the two N×k tensors (maybe empty) and the state
    W_ref = W.detach().requires_grad_()
    torchext.reference.two_layer_square(z, W_ref, V, B, A).sum().backward()
    assert_matches(gW, W_ref.grad, torch.float64)


@pytest.mark.parametrize("face", ["functional", "Function", "Module"])
def test_is_grads_batched_gives_one_jacobian_row_per_sample(face):
    z, W, V, B, A = make_inputs(SHAPES["primes"], torch.float64, seed=75)
    W.requires_grad_()
    V.requires_grad_()
    if face == "Module":
        net = torchext.TwoLayerSquareNet(11, 7, 5, 3, A=A, B=B, dtype=torch.float64)
        with torch.no_grad():
            net.W.copy_(W)
            net.V.copy_(V)
        W, V = net.W, net.V
        f = net(z)
    elif face == "Function":
        f = torchext.TwoLayerSquare.apply(z, W, V, B, A)
    else:
        f = torchext.two_layer_square(z, W, V, B, A)
    eye = torch.eye(f.numel(), dtype=f.dtype)
    jW, jV = torch.autograd.grad(f, (W, V), eye, is_grads_batched=True)
    Wr, Vr = (t.detach().requires_grad_() for t in (W, V))
    want = torch.autograd.functional.jacobian(
        lambda W_, V_: torchext.reference.two_layer_square(z, W_, V_, B, A), (Wr, Vr)
    )
    assert_matches(jW, want[0], torch.float64, "dW")
    assert_matches(jV, want[1], torch.float64, "dV")


@pytest.mark.parametrize("vectorize", [True, False])
def test_autograd_functional_jacobian_and_hessian(vectorize):
    # vectorize=True runs the backward under the legacy vmap (is_grads_batched).
    z, W, V, B, A = make_inputs(SHAPES["primes"], torch.float64, seed=76)
    ref = torchext.reference.two_layer_square
    J = torch.autograd.functional.jacobian(
        lambda W_, V_: torchext.two_layer_square(z, W_, V_, B, A), (W, V), vectorize=vectorize)
    J_ref = torch.autograd.functional.jacobian(lambda W_, V_: ref(z, W_, V_, B, A), (W, V))
    for got, want, name in zip(J, J_ref, ("dW", "dV")):
        assert_matches(got, want, torch.float64, name)
    H = torch.autograd.functional.hessian(
        lambda W_: torchext.two_layer_square(z, W_, V, B, A).sum(), W, vectorize=vectorize)
    H_ref = torch.autograd.functional.hessian(lambda W_: ref(z, W_, V, B, A).sum(), W)
    assert_matches(H, H_ref, torch.float64, "hessian")


def test_functorch_vmap_over_grad_of_a_plain_eager_graph():
    # The graph is recorded outside any transform (the C++ node); vmap batches
    # only its backward, through the internal backward op's vmap rule.
    z, W, V, B, A = make_inputs(SHAPES["primes"], torch.float64, seed=77)
    W.requires_grad_()
    f = torchext.two_layer_square(z, W, V, B, A)
    assert f.grad_fn.name() == CPP_NODE
    eye = torch.eye(f.numel(), dtype=f.dtype)
    J = torch.func.vmap(lambda g: torch.autograd.grad(f, W, g, retain_graph=True)[0])(eye)
    J_ref = torch.autograd.functional.jacobian(
        lambda W_: torchext.reference.two_layer_square(z, W_, V, B, A), W.detach())
    assert_matches(J, J_ref, torch.float64)


@pytest.mark.parametrize("plan", PLANS)
def test_export_with_a_dynamic_batch(plan):
    # An exported program runs at every batch size, across the plan boundaries
    # of "auto" (here direct below 224 samples, folded above).
    net = torchext.TwoLayerSquareNet(3, 61, 64, 3, plan=plan, dtype=torch.float64)
    z = torch.randn(300, 3, dtype=torch.float64)
    ep = torch.export.export(net, (z,), dynamic_shapes={"z": {0: torch.export.Dim("N")}})
    for n in (5, 223, 224, 1000):
        x = torch.randn(n, 3, dtype=torch.float64)
        assert_matches(ep.module()(x), torchext.reference.two_layer_square(x, net.W, net.V, net.B, net.A),
                       torch.float64, f"N={n}")
