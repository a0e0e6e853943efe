"""gradcheck / gradgradcheck / opcheck / torch.compile / torch.export /
torch.func on the public faces. Inputs come from the shared cases (each plan
forced, and "auto"); values are checked against gradcheck or the float64
eager reference taken through the same transform, forward and backward."""
import functools
import subprocess
import sys

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import torchext
from cases import PLANS, SHAPES, Case, cases, module_leaves, net_of
from conftest import DEVICES, assert_matches, python_calls_in_torchext, reference_outputs
from torchext.testing import load_testing_ops, saved_tensors

TESTING = load_testing_ops()  # torch.ops.torchext_testing

OPS = torch.ops.torchext
REF = torchext.reference.two_layer_square
NAMES = ("z", "W", "V", "B", "A")
ALL = (0, 1, 2, 3, 4)  # argnums: every input
OVER_Z = (0, None, None, None, None)  # in_dims: z's leading dimension only


# ---- inputs and faces -------------------------------------------------------

def away_from_kink(case, device="cpu", margin=1e-4):
    """The case's inputs (requiring grad), checked to keep every pre-activation
    W z at |x| > margin: gradcheck's steps (eps 1e-6) move x by a few 1e-6, so
    its finite differences never straddle the ReLU kink."""
    inputs = case.inputs(device, requires_grad=True)
    x = inputs[0].detach() @ inputs[1].detach().T
    assert x.numel() == 0 or x.abs().min() > margin, f"{case.id}: a pre-activation within {margin} of the kink"
    return inputs


def draws(case, like, salt=1):
    """Random tensors shaped like `like` (tangents, cotangents, incoming
    gradients), fixed by the case's seed."""
    g = torch.Generator().manual_seed(case.seed + salt)
    return [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in like]


def face_fn(face, case, inputs):
    """A public face as fn(z, W, V, B, A), under the case's plan where it takes
    one; the Module through torch.func.functional_call (built here, outside
    any transform)."""
    if face == "functional":
        return functools.partial(torchext.two_layer_square, plan=case.plan)
    if face == "Function":
        return torchext.TwoLayerSquare.apply
    if face == "raw-op":
        return OPS.two_layer_square
    net = net_of(case, inputs)
    return lambda z, W, V, B, A: torch.func.functional_call(net, {"W": W, "V": V, "B": B, "A": A}, (z,))


def face_cases(faces, shapes, values=("random",)):
    """pytest parameters (face, case): the functional form and the Module under
    each plan and "auto"; the Function and the raw op, which take no plan,
    under "auto"."""
    out = []
    for face in faces:
        plans = PLANS if face in ("functional", "Module") else ("auto",)
        for param in cases(shapes=shapes, plans=plans, values=values):
            out.append(pytest.param(face, param.values[0], id=f"{face}-{param.id}"))
    return out


FUNC_FACES = ("functional", "Function", "Module")


def summed(fn):
    return lambda *args: fn(*args).sum()


def per_sample_dW(fn):
    """fn's dW for each member of a batch stacked on z's leading dimension."""
    return torch.func.vmap(torch.func.grad(summed(fn), argnums=1), in_dims=OVER_Z)


def nested_vmap(fn, dims):
    for in_dims in dims:
        fn = torch.func.vmap(fn, in_dims=in_dims)
    return fn


# ---- checks against the float64 reference ---------------------------------

def assert_all_match(got, want, what):
    """Tensors, or tuples of them nested like torch.func's Jacobians and Hessians."""
    if isinstance(want, torch.Tensor):
        assert_matches(got, want, torch.float64, what)
        return
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert_all_match(g, w, f"{what}[{NAMES[i] if len(want) == 5 else i}]")


def check_with_gradients(fn, inputs, case):
    """fn's f and its gradients (of Σ g·f, g fixed by the case) against the
    float64 reference; inputs are fn's five leaves."""
    f_ref, g, grads_ref = reference_outputs(inputs, grad_seed=case.seed)
    f = fn(*inputs)
    grads = torch.autograd.grad(f, inputs, g.to(f.dtype).to(f.device))
    assert_matches(f, f_ref, torch.float64, "f")
    assert_all_match(grads, grads_ref, "d")


def assert_vjp_matches(fn, ref, args, case, what):
    """fn's output and its vector-Jacobian product (a cotangent fixed by the
    case) against ref's, ref being the reference through the same transform."""
    out, vjp = torch.func.vjp(fn, *args)
    out_ref, vjp_ref = torch.func.vjp(ref, *args)
    assert_matches(out, out_ref, torch.float64, what)
    (cotangent,) = draws(case, [out_ref])
    assert_all_match(vjp(cotangent), vjp_ref(cotangent), f"{what}: d")


# ---- gradcheck --------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("face,case", face_cases(("functional", "Function", "raw-op"),
                                                 ("primes", "vector", "two-leading", "saved-small")))
def test_gradcheck_and_gradgradcheck(face, case, device):
    inputs = away_from_kink(case, device)
    fn = face_fn(face, case, inputs)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", cases(shapes=("primes",)))
def test_gradcheck_with_vector_A(case, device):
    z, W, V, B, A = away_from_kink(case, device)
    A = A.detach().reshape(-1).requires_grad_()
    fn = functools.partial(torchext.two_layer_square, plan=case.plan)
    assert gradcheck(fn, (z, W, V, B, A))
    assert gradgradcheck(fn, (z, W, V, B, A))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_gradcheck(device):
    # The backward op on its own, including the incoming gradient.
    case = Case("primes")
    z, W, V, B, A = away_from_kink(case, device)
    (g,) = draws(case, [z[..., 0]])
    mask = [True, True, False, True, True]

    def bwd(g, z, W, V, B, A):
        return tuple(o for o in OPS.two_layer_square_backward(g, z, W, V, B, A, mask) if o is not None)

    assert gradcheck(bwd, (g.requires_grad_(), z, W, V, B, A))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", cases(shapes=("primes", "saved-small"), values=("kinks",)))
def test_exact_kink_matches_eager(case, device):
    # Pre-activations exactly 0: ReLU's derivative there is 0, as in torch.relu.
    inputs = case.inputs(device, requires_grad=True)
    assert ((inputs[0] @ inputs[1].T) == 0).any()
    check_with_gradients(functools.partial(torchext.two_layer_square, plan=case.plan), inputs, case)


# ---- opcheck ----------------------------------------------------------------

def _gradients_for(case, f):
    """Incoming gradients for f: a random one and the broadcast scalar that
    .sum() hands back."""
    return (draws(case, [f])[0], torch.ones((), dtype=f.dtype, device=f.device).expand(f.shape))


def _public_samples(device):
    """Every layout and dtype, with and without requires_grad, and an empty batch."""
    for dtype in (torch.float32, torch.float64):
        for layout in ("contiguous", "transposed"):
            for requires_grad in (False, True):
                yield Case("primes", dtype=dtype, layout=layout), requires_grad
    yield Case("empty-batch"), True


def _planned_samples(device):
    """Every plan and "auto", saved (d + k >= 64) and recomputed state, an empty batch."""
    for shape in ("primes", "saved-small", "empty-batch"):
        for plan in PLANS:
            yield Case(shape, plan), True


def _opcheck_args(op, device):
    masks = ([True] * 5, [False, True, True, False, True])
    if op in ("two_layer_square", "_two_layer_square_autograd"):
        for case, requires_grad in _public_samples(device):
            inputs = [t.requires_grad_(requires_grad) for t in case.inputs(device)]
            yield inputs if op == "two_layer_square" else [*inputs, case.plan]
    elif op == "two_layer_square_backward":  # (differentiable samples: its own autograd checked)
        for case, requires_grad in _public_samples(device):
            if not requires_grad:
                continue
            inputs = [t.requires_grad_() for t in case.inputs(device)]
            for g, mask in zip(_gradients_for(case, OPS.two_layer_square(*inputs).detach()), masks):
                yield [g.detach().requires_grad_(), *inputs, mask]
    elif op == "_two_layer_square_forward":
        for case, _ in _planned_samples(device):
            for save in (False, True):
                yield [*case.inputs(device), case.plan, save]
    elif op == "_two_layer_square_backward":
        for case, _ in _planned_samples(device):
            inputs = case.inputs(device)
            for save in (False, True):
                f, *state = OPS._two_layer_square_forward(*inputs, case.plan, save)
                for g, mask in zip(_gradients_for(case, f), masks):
                    yield [g, *inputs, *state, mask]
    else:
        raise AssertionError(f"no opcheck samples for torchext::{op}")


def torchext_ops():
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("torchext::"))


EVERY_OP = ("_two_layer_square_autograd", "_two_layer_square_backward", "_two_layer_square_forward",
            "two_layer_square", "two_layer_square_backward")


def test_every_op_has_opcheck_samples_and_no_test_op_is_public():
    # A new op in torch.ops.torchext fails here until it gets samples below;
    # the test-only ops (loaded by conftest) stay in their own namespace.
    assert tuple(torchext_ops()) == EVERY_OP
    testing = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
               if name.startswith("torchext_testing::")}
    assert testing and not testing & set(EVERY_OP)


def test_test_only_ops_are_registered_only_on_request():
    code = """
import torch, torchext, torchext.testing
def names():
    return [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("torchext_testing::")]
assert names() == [], names()
ops = torchext.testing.load_testing_ops()
assert ops is torch.ops.torchext_testing and len(names()) == 8, names()
assert ops._plan(10, 4, 4, 4, 4, "direct") == "direct"
torchext.testing.load_testing_ops()  # once only: no second registration
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# (d, k) below and above keeps_saved's width; z a vector, a batch, and 3-D
@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
@pytest.mark.parametrize("d, k", [(40, 20), (40, 30)])
def test_node_floor_saves_and_returns_as_the_route_does(batch, d, k):
    """The benchmark's C++ node floor (testing op _noop_node) saves tensors
    of the shapes the plain-eager route saves and returns zero gradients of
    every input's shape."""
    m, ell = 7, 3
    inputs = [torch.randn(*batch, d), torch.randn(k, d), torch.randn(m, k), torch.randn(ell, m), torch.randn(1, ell)]
    inputs = [t.requires_grad_() for t in inputs]
    f_route, route = saved_tensors(lambda: torchext.two_layer_square(*inputs))
    f, floor = saved_tensors(lambda: TESTING._noop_node(*inputs))
    route, floor = [t.shape for t in route], [t.shape for t in floor]
    # (the last saved tensor, the state, is empty; its sizes name the plan)
    assert f.shape == f_route.shape and len(floor) == len(route) == 8 and floor[:7] == route[:7]
    grads = torch.autograd.grad(f.sum(), inputs)
    assert [g.shape for g in grads] == [t.shape for t in inputs] and not any(g.any() for g in grads)
    with pytest.raises(ValueError, match="z must have at least 1 dimension"):
        TESTING._noop_node(torch.tensor(1.0), *inputs[1:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", EVERY_OP)
def test_opcheck(op, device):
    for args in _opcheck_args(op, device):
        torch.library.opcheck(getattr(OPS, op).default, args)


# ---- torch.compile ----------------------------------------------------------

def check_module_at_batches(compiled, net, z, sizes, case):
    """The compiled module's f and all five gradients on the first n samples of z, for each n."""
    for n in sizes:
        leaves = [z[:n].detach().requires_grad_(), net.W, net.V, net.B, net.A]
        check_with_gradients(lambda z, *_: compiled(z), leaves, case)


@pytest.mark.parametrize("case", cases(shapes=("primes", "saved-small")))
def test_compile_fullgraph_module_forward_backward(case):
    torch._dynamo.reset()
    net, leaves = module_leaves(case)
    compiled = torch.compile(net, fullgraph=True)
    check_with_gradients(lambda z, *_: compiled(z), leaves, case)


@pytest.mark.parametrize("case", cases(shapes=("primes", "narrow-odd-k", "two-leading", "saved-small")))
def test_compile_fullgraph_functional_forward_backward(case):
    torch._dynamo.reset()
    compiled = torch.compile(functools.partial(torchext.two_layer_square, plan=case.plan), fullgraph=True)
    check_with_gradients(compiled, case.inputs(requires_grad=True), case)


def test_compile_fullgraph_function_forward_backward():
    torch._dynamo.reset()
    case = Case("saved")
    compiled = torch.compile(torchext.TwoLayerSquare.apply, fullgraph=True)
    check_with_gradients(compiled, case.inputs(requires_grad=True), case)


@pytest.mark.parametrize("case", cases(shapes=("narrow-odd-k",)))
def test_compile_dynamic_batch_uses_symbolic_meta_kernels(case):
    torch._dynamo.reset()
    net, (z, *_) = module_leaves(case)
    compiled = torch.compile(net, fullgraph=True, dynamic=True)
    check_module_at_batches(compiled, net, z, (5, 17, 33), case)


@pytest.mark.parametrize("case", cases(shapes=("primes",)))
def test_compile_max_autotune_no_cudagraphs(case):
    torch._dynamo.reset()
    net, leaves = module_leaves(case)
    compiled = torch.compile(net, mode="max-autotune-no-cudagraphs", fullgraph=True)
    check_with_gradients(lambda z, *_: compiled(z), leaves, case)


@pytest.mark.parametrize("case", cases(shapes=("chunk-and-tail",)))
def test_mark_dynamic_batch_compiles_once(case):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    net, (z, *_) = module_leaves(case)
    compiled = torch.compile(net, backend=counter, fullgraph=True)

    def marked(z):
        torch._dynamo.mark_dynamic(z, 0)
        return compiled(z)

    check_module_at_batches(marked, net, z, (2, 3, 17, 64, 1000), case)
    assert counter.frame_count == 1


# ---- torch.export -----------------------------------------------------------

def bound_arguments(node):
    """A graph node's arguments by name, defaults filled in from the op's schema."""
    schema = node.target._schema
    args = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    args.update(zip((a.name for a in schema.arguments), node.args))
    args.update(node.kwargs)
    return args


def assert_exports_the_planned_forward(ep, plan):
    """One call of the internal forward op with the plan asked for and nothing
    saved (export records inference; the backward recomputes), undecomposed."""
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    targets = [str(n.target) for n in calls]
    fused = [n for n in calls if str(n.target).startswith("torchext.")]
    assert [str(n.target) for n in fused] == ["torchext._two_layer_square_forward.default"], targets
    args = bound_arguments(fused[0])
    assert args["plan"] == plan and args["save_for_backward"] is False, args
    assert not any("mm" in t or "relu" in t for t in targets), targets


def exported_leaves(ep, z):
    """The exported module's five leaves: z (requiring grad) and its W, V, B, A."""
    module = ep.module()
    params = dict(module.named_parameters())
    return module, [z.detach().requires_grad_(), *(params[name] for name in "WVBA")]


@pytest.mark.parametrize("case", cases(shapes=("vector", "primes", "two-leading", "saved-small", "empty-batch")))
def test_export_of_module(case):
    net, (z, *_) = module_leaves(case)
    ep = torch.export.export(net, (z.detach(),))
    assert_exports_the_planned_forward(ep, case.plan)
    # Other values of the same shape (exact kinks among them): nothing is baked in.
    other = Case(case.shape, case.plan, values="kinks").inputs()[0]
    for x in (z, other):
        module, leaves = exported_leaves(ep, x)
        check_with_gradients(lambda z, *_: module(z), leaves, case)


@pytest.mark.parametrize("case", cases(shapes=("auto-boundary",)))
def test_export_with_a_dynamic_batch(case):
    # An exported program runs at every batch size, across the plan
    # boundaries of "auto" (the training and the inference cost's).
    dims, sizes = SHAPES[case.shape][1:], (5, 223, 224, 1000)
    for training in (True, False):
        assert len({TESTING._plan(n, *dims, "auto", training) for n in sizes}) > 1
    net, (z, *_) = module_leaves(case)
    ep = torch.export.export(net, (z[:300].detach(),), dynamic_shapes={"z": {0: torch.export.Dim("N")}})
    assert_exports_the_planned_forward(ep, case.plan)
    for n in sizes:
        module, leaves = exported_leaves(ep, z[:n])
        check_with_gradients(lambda z, *_: module(z), leaves, case)


# ---- torch.func -------------------------------------------------------------

@pytest.mark.parametrize("face,case", face_cases(FUNC_FACES, ("primes", "vector", "saved-small"))
                         + face_cases(FUNC_FACES, ("primes",), values=("kinks",)))
def test_torch_func_grad_and_hessian(face, case):
    inputs = case.inputs()
    loss, loss_ref = summed(face_fn(face, case, inputs)), summed(REF)
    assert_all_match(torch.func.grad(loss, ALL)(*inputs), torch.func.grad(loss_ref, ALL)(*inputs), "d")
    hessian = torch.func.jacrev(torch.func.jacrev(loss, ALL), ALL)
    hessian_ref = torch.func.jacrev(torch.func.jacrev(loss_ref, ALL), ALL)
    assert_all_match(hessian(*inputs), hessian_ref(*inputs), "H")


@pytest.mark.parametrize("face,case", face_cases(FUNC_FACES, ("two-leading", "saved-small")))
def test_vmap_over_batch_and_weights(face, case):
    z, W, V, B, A = inputs = case.inputs()
    fn = face_fn(face, case, inputs)
    ensembles = (torch.stack([W, 2 * W, -W]), torch.stack([V, 0.5 * V]), torch.stack([B, -B]),
                 torch.stack([A, 3 * A, -A, A]))
    transforms = [("over z's batch", [OVER_Z], inputs)]
    if z.dim() > 2:
        transforms.append(("over z's two leading dims", [OVER_Z, OVER_Z], inputs))
    for i, members in enumerate(ensembles, start=1):
        dims = tuple(0 if j == i else None for j in range(5))
        args = [members if j == i else t for j, t in enumerate(inputs)]
        transforms.append((f"an ensemble over {NAMES[i]}", [dims], args))
    for what, dims, args in transforms:
        assert_vjp_matches(nested_vmap(fn, dims), nested_vmap(REF, dims), args, case, what)


@pytest.mark.parametrize("face,case", face_cases(FUNC_FACES, ("primes", "saved-small")))
def test_per_sample_gradients_are_not_summed(face, case):
    inputs = case.inputs()

    def per_sample(fn):
        return torch.func.vmap(torch.func.grad(fn, argnums=ALL), in_dims=OVER_Z)

    got = per_sample(face_fn(face, case, inputs))(*inputs)
    assert got[1].shape == (inputs[0].shape[0], *inputs[1].shape)  # one dW per sample
    assert_all_match(got, per_sample(REF)(*inputs), "per-sample d")


def test_forward_mode_on_the_function_raises_clearly():
    # TwoLayerSquare has no jvp (Dynamo could not trace it if it had): forward
    # mode through it is refused by PyTorch with a clear error, never wrong.
    z, W, V, B, A = Case("primes").inputs()
    jvp_of_W = lambda W: torch.func.jvp(  # noqa: E731
        lambda W: torchext.TwoLayerSquare.apply(z, W, V, B, A), (W,), (torch.ones_like(W),))
    with pytest.raises(NotImplementedError, match="jvp"):
        jvp_of_W(W)
    # ...also under torch.compile, where the traced Function gave a zero tangent
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.compile(jvp_of_W, backend="aot_eager")(W)


@pytest.mark.parametrize("case", cases(shapes=("primes", "saved-small")) + cases(shapes=("primes",), values=("kinks",)))
def test_forward_mode_jvp_jacfwd_hessian(case):
    inputs = tuple(case.inputs())
    fn = functools.partial(torchext.two_layer_square, plan=case.plan)
    tangents = tuple(draws(case, inputs))
    assert_all_match(torch.func.jvp(fn, inputs, tangents), torch.func.jvp(REF, inputs, tangents), "(f, jvp)")
    assert_all_match(torch.func.jacfwd(fn, ALL)(*inputs), torch.func.jacfwd(REF, ALL)(*inputs), "J")
    # forward over reverse: the backward's own forward-mode derivative
    assert_all_match(torch.func.hessian(summed(fn), ALL)(*inputs),
                     torch.func.hessian(summed(REF), ALL)(*inputs), "H")


@pytest.mark.parametrize("case", cases(shapes=("primes", "saved-small"), plans=("auto",)))
def test_forward_mode_nested(case):
    # jvp(jvp) and jacfwd(jacfwd): an outer forward level does not
    # differentiate a Function's jvp (zeros); jacrev(hessian): torch refuses
    # the Function between two grad levels. These go through differentiable
    # torch ops instead; jacrev(jacfwd) stays on the Functions.
    z, W, V, B, A = case.inputs()
    func = torch.func
    d2 = {}
    for name, fn in (("ext", torchext.two_layer_square), ("ref", REF)):
        of_W = lambda W_: fn(z, W_, V, B, A).sum()  # noqa: E731
        of_VB = lambda V_, B_: fn(z, W, V_, B_, A).sum()  # noqa: E731
        tW = torch.ones_like(W)
        d2[name] = (
            func.jacfwd(func.jacfwd(of_W))(W),
            func.jvp(lambda W_: func.jvp(of_W, (W_,), (tW,))[1], (W,), (tW,))[1],
            func.jacrev(func.jacfwd(of_W))(W),
            func.jacrev(func.hessian(of_VB, argnums=0), argnums=1)(V, B),
        )
    assert d2["ref"][0].abs().max() > 0
    assert_all_match(d2["ext"], d2["ref"], "second/third-order derivative ")


def test_forward_mode_nesting_the_functions_serve_stays_fused():
    # One forward level over or under grad levels: the planned forward op
    # and its Function's rules, not the eager composition.
    z, W, V, B, A = Case("saved-small").inputs()
    of_W = lambda W_: torchext.two_layer_square(z, W_, V, B, A).sum()  # noqa: E731
    for name, compose in (("hessian", torch.func.hessian),
                          ("jacrev(jacfwd)", lambda f: torch.func.jacrev(torch.func.jacfwd(f)))):
        calls = python_calls_in_torchext(lambda: compose(of_W)(W))
        assert "setup_planned_context" in calls and "_eager_composition" not in calls, name


def test_eager_composition_route_keeps_the_ops_checks_and_dtype_policy():
    z, W, V, B, A = Case("primes").inputs()
    twice = lambda fn: torch.func.jacfwd(torch.func.jacfwd(fn))  # noqa: E731
    with pytest.raises(ValueError, match="A must have shape"):
        twice(lambda W_: torchext.two_layer_square(z, W_, V, B, A.reshape(-1, 1)).sum())(W)
    with pytest.raises(TypeError, match="z must be a floating-point tensor"):
        twice(lambda W_: torchext.two_layer_square(z.long(), W_, V, B, A).sum())(W)
    with pytest.raises(RuntimeError, match=r"B must be on the same device as z \(cpu\); got meta"):
        twice(lambda W_: torchext.two_layer_square(z, W_, V, B.to("meta"), A.reshape(-1, 1)).sum())(W)
    # Under autocast, f in float32 from float32 arithmetic, as the ops give it.
    z, W, V, B, A = (t.float() for t in (z, W, V, B, A))
    tangent = torch.ones_like(W)
    jvp1 = lambda W_, V_=V: torch.func.jvp(  # noqa: E731
        lambda W2: torchext.two_layer_square(z, W2, V_, B, A), (W_,), (tangent,))[1]
    jvp2 = lambda V_=V: torch.func.jvp(lambda W_: jvp1(W_, V_), (W,), (tangent,))  # noqa: E731

    def assert_float32_close(got, want):
        for g, w in zip(got, want):
            assert g.dtype == torch.float32 and torch.allclose(g, w, rtol=1e-5, atol=1e-5)

    want = jvp2()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = jvp2()
    assert_float32_close(got, want)
    # ...and, as the ops under autocast, inputs of mixed dtypes
    want = jvp2(V.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = jvp2(V.bfloat16())
    assert_float32_close(got, want)
    # ...and under torch.compile, which takes the route for one forward level
    want = jvp1(W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.compile(jvp1, backend="aot_eager", fullgraph=True)(W)
    assert_float32_close((got,), (want,))


@pytest.mark.parametrize("case", cases(shapes=("primes", "saved-small"), plans=("auto",)))
def test_forward_mode_and_torch_func_under_compile(case):
    # Dynamo traces the op under jvp (custom ops have no forward mode: the
    # tangent would be zero) and cannot trace the Functions' rules under
    # torch.func: these compile the differentiable torch ops.
    inputs = case.inputs()
    tangents = tuple(draws(case, inputs))
    jvp_of = lambda fn: lambda *a: torch.func.jvp(fn, a, tangents)[1]  # noqa: E731
    got = torch.compile(jvp_of(torchext.two_layer_square), backend="aot_eager", fullgraph=True)(*inputs)
    assert_matches(got, jvp_of(REF)(*inputs), torch.float64, "jvp")
    zb = inputs[0].unsqueeze(0).expand(2, *inputs[0].shape)
    got = torch.compile(per_sample_dW(torchext.two_layer_square), backend="aot_eager")(zb, *inputs[1:])
    assert_matches(got, per_sample_dW(REF)(zb, *inputs[1:]), torch.float64, "per-sample dW")


@pytest.mark.parametrize("face,backend", [("functional", "eager"), ("functional", "aot_eager"),
                                          ("Function", "eager"), ("Function", "aot_eager")])
@pytest.mark.parametrize("case", cases(shapes=("saved-small",), plans=("auto",)))
def test_torch_func_around_a_compiled_face(case, face, backend):
    # Transforms outside torch.compile: Dynamo may leave the compiled frame to
    # eager and compile the frames nested in it instead (the planned
    # Function's vmap rule, the Function a backward applies), which it cannot
    # trace. (The vjp of a vmap of TwoLayerSquare compiled by the debugging
    # backend "eager" is left to Dynamo: its fake-tensor conversion fails.)
    inputs = case.inputs()
    zb = torch.stack([inputs[0], -inputs[0]])
    tangent = draws(case, inputs[1:2])[0]
    checks = {
        "vmap": lambda fn: torch.func.vmap(fn, in_dims=OVER_Z)(zb, *inputs[1:]),
        "dW": lambda fn: torch.func.grad(summed(fn), argnums=1)(*inputs),
        "per-sample dW": lambda fn: per_sample_dW(fn)(zb, *inputs[1:]),
        "vjp of vmap": lambda fn: torch.func.vjp(torch.func.vmap(fn, in_dims=OVER_Z), zb, *inputs[1:])[1](
            torch.ones(zb.shape[:2], dtype=zb.dtype)),
        "jvp": lambda fn: torch.func.jvp(lambda W: fn(inputs[0], W, *inputs[2:]), (inputs[1],), (tangent,))[1],
    }
    if face == "Function":  # (it has no jvp)
        del checks["jvp"]
        if backend == "eager":
            del checks["vjp of vmap"]
    for what, check in checks.items():
        torch._dynamo.reset()  # each compiled afresh, not served from the previous check's cache
        compiled = torch.compile(face_fn(face, case, inputs), backend=backend)
        assert_all_match(check(compiled), check(REF), what)


@pytest.mark.parametrize("case", cases(shapes=("primes", "saved-small")))
def test_forward_ad_dual_tensors_in_eager(case):
    import torch.autograd.forward_ad as fwAD

    inputs = case.inputs(requires_grad=True)
    tangents = draws(case, inputs)
    with fwAD.dual_level():
        f, tangent = fwAD.unpack_dual(torchext.two_layer_square(
            *[fwAD.make_dual(t, dt) for t, dt in zip(inputs, tangents)], plan=case.plan))
    f_ref, want = torch.func.jvp(REF, tuple(t.detach() for t in inputs), tuple(tangents))
    assert_matches(f, f_ref, torch.float64, "f")
    assert_matches(tangent, want, torch.float64, "jvp")
    # the backward of the graph recorded through the dual tensors
    _, g, grads_ref = reference_outputs(inputs, grad_seed=case.seed)
    assert_all_match(torch.autograd.grad(f, inputs, g), grads_ref, "d")


@pytest.mark.parametrize("case", cases(shapes=("primes", "saved-small")))
@pytest.mark.parametrize("create_graph", [False, True])
def test_forward_over_reverse_with_dual_tensors_in_eager(case, create_graph):
    # A backward inside a dual level: the gradients carry tangents (the
    # Hessian times the inputs' tangents), which the fused backward must pass on.
    import torch.autograd.forward_ad as fwAD

    inputs = case.inputs(requires_grad=True)
    tangents = draws(case, inputs)
    leaves = [t.detach().double().requires_grad_() for t in inputs]

    def gradients(fn, xs):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t, dt.to(t.dtype)) for t, dt in zip(xs, tangents)]
            grads = torch.autograd.grad(fn(*duals).sum(), xs, create_graph=create_graph)
            return [fwAD.unpack_dual(g) for g in grads]

    got = gradients(lambda *a: torchext.two_layer_square(*a, plan=case.plan), inputs)
    want = gradients(REF, leaves)
    for name, (g, t), (g_ref, t_ref) in zip(NAMES, got, want):
        assert_matches(g, g_ref, torch.float64, f"d{name}")
        assert t is not None, f"d{name} lost its tangent"
        assert_matches(t, t_ref, torch.float64, f"tangent of d{name}")


def test_dual_gradient_into_a_plain_eager_graph_raises_clearly():
    # f from the C++ node (no dual level then), a dual incoming gradient later:
    # the node cannot carry its tangent, and says so rather than dropping it.
    import torch.autograd.forward_ad as fwAD

    inputs = Case("primes").inputs(requires_grad=True)
    f = torchext.two_layer_square(*inputs)
    with fwAD.dual_level():
        g = fwAD.make_dual(torch.ones_like(f), torch.ones_like(f))
        with pytest.raises(RuntimeError, match="forward-mode AD through its backward"):
            torch.autograd.grad(f, inputs, g)


def test_forward_ad_tangent_under_autocast_has_fs_dtype():
    import torch.autograd.forward_ad as fwAD

    inputs = Case("primes", dtype=torch.float32).inputs()
    tangent = torch.randn_like(inputs[0])
    low = [t.bfloat16() for t in inputs]
    with fwAD.dual_level():
        dual = fwAD.make_dual(low[0], tangent.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f, f_dot = fwAD.unpack_dual(torchext.two_layer_square(dual, *low[1:]))
    assert f.dtype == f_dot.dtype == torch.float32
    zeros = [torch.zeros_like(t) for t in inputs[1:]]
    _, want = torch.func.jvp(REF, tuple(t.float() for t in low), (tangent.bfloat16().float(), *zeros))
    torch.testing.assert_close(f_dot, want, rtol=1e-4, atol=1e-4)


def test_second_order_under_autocast_in_float32():
    # The backward's derivative (double_backward, in torch ops) computes in
    # the op's float32 under autocast, as the kernels do: second orders equal
    # those outside autocast (in bfloat16 they differ by percents).
    z, W, V, B, A = Case("saved-small", dtype=torch.float32).inputs()

    def twice(W_):
        gW, = torch.autograd.grad(torchext.two_layer_square(z, W_, V, B, A).sum(), W_, create_graph=True)
        return torch.autograd.grad((gW * gW).sum(), W_)[0]

    hess = torch.func.hessian(lambda W_: torchext.two_layer_square(z, W_, V, B, A).sum())
    want = (twice(W.clone().requires_grad_()), hess(W))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (twice(W.clone().requires_grad_()), hess(W))
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_jvp_on_meta_tensors():
    # (meta has no autocast: the jvp must not try to turn it off there)
    meta = [torch.empty(s, device="meta") for s in ((5, 3), (4, 3), (2, 4), (3, 2), (3,))]
    f, f_dot = torch.func.jvp(torchext.two_layer_square, tuple(meta), tuple(meta))
    assert f.shape == f_dot.shape == (5,) and f_dot.device.type == "meta"


def test_double_backward_and_jvp_with_zero_input_width():
    z, W = torch.randn(3, 0, dtype=torch.float64), torch.randn(2, 0, dtype=torch.float64)
    V = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    B, A = torch.randn(2, 4, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    gV, = torch.autograd.grad(torchext.two_layer_square(z, W, V, B, A).sum(), V, create_graph=True)
    ggV, = torch.autograd.grad(gV.sum(), V)
    assert torch.equal(ggV, torch.zeros_like(V))
    f, f_dot = torch.func.jvp(torchext.two_layer_square, (z, W, V.detach(), B, A),
                              (z, W, torch.ones_like(V), B, A))
    assert f.shape == f_dot.shape == (3,) and not f_dot.any()


@pytest.mark.parametrize("face,case", face_cases(FUNC_FACES, ("primes", "saved-small")))
def test_is_grads_batched_gives_one_jacobian_row_per_sample(face, case):
    inputs = case.inputs()
    if face == "Module":
        net = net_of(case, inputs)
        leaves = [inputs[0].requires_grad_(), net.W, net.V, net.B, net.A]
        f = net(leaves[0])
    else:
        leaves = [t.requires_grad_() for t in inputs]
        f = face_fn(face, case, inputs)(*leaves)
    detached = tuple(t.detach() for t in leaves)
    assert_matches(f, REF(*detached), torch.float64, "f")
    rows = torch.eye(f.numel(), dtype=f.dtype).reshape(f.numel(), *f.shape)
    jacobian = torch.autograd.grad(f, leaves, rows, is_grads_batched=True)
    assert_all_match(jacobian, torch.autograd.functional.jacobian(REF, detached), "J")


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("case", cases(shapes=("primes", "saved-small")))
def test_autograd_functional_jacobian_and_hessian(case, vectorize):
    # vectorize=True runs the backward under the legacy vmap (is_grads_batched).
    inputs = tuple(case.inputs())
    fn = functools.partial(torchext.two_layer_square, plan=case.plan)
    assert_matches(fn(*inputs), REF(*inputs), torch.float64, "f")
    J = torch.autograd.functional.jacobian(fn, inputs, vectorize=vectorize)
    assert_all_match(J, torch.autograd.functional.jacobian(REF, inputs, vectorize=True), "J")
    H = torch.autograd.functional.hessian(summed(fn), inputs, vectorize=vectorize)
    assert_all_match(H, torch.autograd.functional.hessian(summed(REF), inputs, vectorize=True), "H")


@pytest.mark.parametrize("case", cases(shapes=("primes", "saved-small")))
def test_functorch_vmap_over_grad_of_a_plain_eager_graph(case):
    # The graph is recorded outside any transform (the C++ node, with the
    # forward's saved r and q where d + k >= 64); vmap batches only its
    # backward, through the internal backward op's vmap rule.
    leaves = case.inputs(requires_grad=True)
    f = torchext.two_layer_square(*leaves, plan=case.plan)
    detached = tuple(t.detach() for t in leaves)
    assert_matches(f, REF(*detached), torch.float64, "f")
    rows = torch.eye(f.numel(), dtype=f.dtype).reshape(f.numel(), *f.shape)
    jacobian = torch.func.vmap(lambda g: torch.autograd.grad(f, leaves, g, retain_graph=True))(rows)
    assert_all_match(jacobian, torch.autograd.functional.jacobian(REF, detached), "J")


# ---- the plain-eager C++ node -----------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", cases(shapes=("vector", "primes", "saved"), dtypes=(torch.float32,)))
def test_plain_eager_is_one_node_without_python_matching_the_op_route(case, device):
    # In plain eager the functional form records one autograd node between f
    # and the leaves, and its backward runs no torchext Python. It runs the
    # same ops as the route torch.compile and torch.func take (the internal
    # forward op through its registered autograd), so the numbers agree
    # bitwise, and both match the float64 reference.
    inputs = case.inputs(device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    f = torchext.two_layer_square(*leaves, plan=case.plan)
    assert [node.variable for node, _ in f.grad_fn.next_functions] == leaves  # straight to the leaves
    assert not isinstance(f.grad_fn, torch.autograd.function.BackwardCFunction)  # no Python Function
    f_ref, g, grads_ref = reference_outputs(inputs, grad_seed=case.seed)
    g = g.to(f.dtype).to(device)
    first = torch.autograd.grad(f, leaves, g, retain_graph=True)
    calls = python_calls_in_torchext(lambda: f.backward(g))  # the retained graph, again
    if device == "cpu":  # (the engine runs CPU backwards on this thread, the profiled one)
        assert calls == [], f"the backward entered torchext's Python: {calls}"

    twins = [t.clone().requires_grad_() for t in inputs]
    f_op = OPS._two_layer_square_forward(*twins, case.plan, True)[0]
    f_op.backward(g)
    assert torch.equal(f.detach(), f_op.detach())
    for name, a, b, once in zip(NAMES, leaves, twins, first):
        assert torch.equal(a.grad, b.grad) and torch.equal(a.grad, once), name
    assert_matches(f, f_ref, torch.float32, "f")
    for name, a, want in zip(NAMES, leaves, grads_ref):
        assert_matches(a.grad, want, torch.float32, f"d{name}")


def test_plain_eager_without_grad_records_nothing():
    z, W, V, B, A = Case("primes", dtype=torch.float32).inputs()
    with_grad = [t.requires_grad_() for t in (W, V)]
    with torch.no_grad():
        f = torchext.two_layer_square(z, *with_grad, B, A)
    assert f.grad_fn is None and not f.requires_grad
    assert torchext.two_layer_square(z, W.detach(), V.detach(), B, A).grad_fn is None
    assert torch.equal(f, torchext.two_layer_square(z, W, V, B, A).detach())


def test_plain_eager_node_guards_its_saved_inputs():
    z, W, V, B, A = Case("primes", dtype=torch.float32).inputs()
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
    case = Case("primes")
    inputs = case.inputs(requires_grad=True)
    f_ref, g, grads_ref = reference_outputs(inputs, grad_seed=case.seed)

    def f_and_grads():
        f = torchext.two_layer_square(*inputs)
        return f, torch.autograd.grad(f, inputs, g)

    with torch.autograd.detect_anomaly():
        (f, grads), packed = saved_tensors(f_and_grads)
    assert len(packed) == 8  # z, W, V, B, A, the two N×k tensors (maybe empty) and the state
    assert_matches(f, f_ref, torch.float64, "f")
    assert_all_match(grads, grads_ref, "d")
