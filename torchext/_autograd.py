"""Autograd of the compiled ops, one formula for every face: the raw ops get it
through torch.library.register_autograd, and the autograd.Functions
(`TwoLayerSquare` and the planned twins in function.py) call the same backward
functions, which call a fused backward op once. The backward ops are
differentiable too (double_backward: Hessian-vector products in closed form),
and forward mode reuses the same closed form (tangent_of_f)."""
import torch

from . import _library  # noqa: F401  (loads the operators)
from . import _torch_private

_ops = torch.ops.torchext


def plain_eager():
    """True outside torch.func transforms and torch.compile tracing: then the
    autograd.Function has already taken care of autograd, and the op can be
    called below the Autograd key, skipping its (redundant) registered autograd
    layer — a large share of the call overhead at small sizes."""
    return not (_torch_private.functorch_transforms_active() or torch.compiler.is_compiling())


def call_op(op, *args):
    """Calls a compiled op (or a function of one); below the Autograd key when nothing is to be
    recorded (grad mode off, plain eager) — inside a Function's forward, or in
    a first-order backward. Otherwise (create_graph=True, compile tracing,
    torch.func) through it, so the op's registered formula is recorded."""
    if not torch.is_grad_enabled() and plain_eager():
        with _torch_private.below_autograd():
            return op(*args)
    return op(*args)


def forward(z, W, V, B, A):
    """The fused forward op, as called from inside an autograd.Function."""
    return call_op(_ops.two_layer_square, z, W, V, B, A)


def setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def tangent_of_f(z, W, V, B, A, tangents):
    """Forward-mode derivative of f along the input tangents (None = 0): the
    directional derivative that double_backward also gives for the incoming
    gradient's slot."""
    ones = z.new_ones(z.shape[:-1])
    needs = (True, False, False, False, False, False)
    return double_backward(ones, z, W, V, B, A, tangents, needs)[0]


def backward(ctx, grad):
    """One call of the fused backward op: every requested gradient, None for the rest."""
    z, W, V, B, A = ctx.saved_tensors
    mask = [bool(b) for b in ctx.needs_input_grad[:5]]
    if not any(mask):
        return (None,) * 5
    return tuple(_call_backward(grad, z, W, V, B, A, None, mask))


def _setup_backward_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])  # grad, z, W, V, B, A


def _backward_of_backward(ctx, *cotangents):
    """Autograd of either backward op (their first six inputs are grad, z, W, V,
    B, A; the rest — saved r, q, state, mask — get no gradient)."""
    grad, z, W, V, B, A = ctx.saved_tensors[:6]
    grads = double_backward(grad, z, W, V, B, A, cotangents, ctx.needs_input_grad[:6])
    return (*grads, *[None] * (len(ctx.needs_input_grad) - 6))


def per_member(info, in_dims, args, fn, unbatched=()):
    """The one per-member vmap rule: fn(*member_args) for each vmap member,
    each result stacked along dim 0 (None stays None); results at the indices
    in `unbatched` (a forward's state) are the same for every member and come
    back unbatched. Weight gradients sum over the samples of one member only,
    never across members, hence one call per member. An empty vmap runs fn
    once on zero-filled member-shaped arguments, for the results' shapes."""
    if info.batch_size == 0:
        members = [tuple(t if dim is None else t.new_zeros(t.shape[:dim] + t.shape[dim + 1:])
                         for t, dim in zip(args, in_dims))]
    else:
        members = [tuple(t if dim is None else t.select(dim, i) for t, dim in zip(args, in_dims))
                   for i in range(info.batch_size)]
    results = [fn(*member) for member in members]
    single = isinstance(results[0], torch.Tensor)
    if single:
        results = [(res,) for res in results]
    outs, dims = [], []
    for i, first in enumerate(results[0]):
        if first is None or i in unbatched:
            outs.append(first)
            dims.append(None)
        elif info.batch_size == 0:
            outs.append(first.new_empty((0, *first.shape)))
            dims.append(0)
        else:
            outs.append(torch.stack([res[i] for res in results]))
            dims.append(0)
    return (outs[0], dims[0]) if single else (tuple(outs), tuple(dims))


def check_unbatched_state(in_dims, state_index):
    if in_dims[state_index] is not None:
        raise ValueError("two_layer_square: the state of a forward cannot be batched under vmap")


def fused_backward(grad, z, W, V, B, A, r, q, state, mask):
    """The internal backward op with a planned forward's r, q and state (the
    state holds its plan; r and q are empty where the backward recomputes them
    chunk by chunk), or, with all three None, the public backward op."""
    if state is None:
        return _ops.two_layer_square_backward(grad, z, W, V, B, A, mask)
    return _ops._two_layer_square_backward(grad, z, W, V, B, A, r, q, state, mask)


class TwoLayerSquareBackward(torch.autograd.Function):
    """The internal fused backward op as an autograd.Function, so that it is
    differentiable under torch.func transforms too (jacrev(jacrev(...)),
    vmap(grad(...))); plain autograd gets there through the op's own
    registration below. Both use double_backward. r, q and state are the
    planned forward's (see fused_backward)."""

    @staticmethod
    def forward(grad, z, W, V, B, A, r, q, state, output_mask):
        return fused_backward(grad, z, W, V, B, A, r, q, state, output_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_backward_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:9])
        ctx.output_mask = list(inputs[9])

    backward = staticmethod(_backward_of_backward)

    @staticmethod
    def jvp(ctx, t_grad, tz, tW, tV, tB, tA, *_):
        # d(∇_θ Σ g f) = ∇_θ Σ ġ f (the backward op with ġ) + H θ̇ (double_backward).
        grad, z, W, V, B, A, r, q, state = ctx.saved_tensors
        mask = ctx.output_mask
        out = double_backward(grad, z, W, V, B, A, (tz, tW, tV, tB, tA), [False, *mask])[1:]
        if t_grad is not None:
            extra = fused_backward(t_grad, z, W, V, B, A, r, q, state, mask)
            out = [o if e is None else o + e for o, e in zip(out, extra)]
        return tuple(o if m else None for o, m in zip(out, mask))

    @staticmethod
    def vmap(info, in_dims, grad, z, W, V, B, A, r, q, state, output_mask):
        check_unbatched_state(in_dims, 8)
        return per_member(info, in_dims[:8], (grad, z, W, V, B, A, r, q),
                          lambda *args: TwoLayerSquareBackward.apply(*args, state, output_mask))


def _common_dtype(grad, z, W, V, B, A):
    """Under autocast the op ran on float32 casts of the inputs and returned f
    in float32, but autograd saved the inputs themselves: bring the incoming
    gradient and the inputs to one dtype again, so that the backward and its
    own derivative (double_backward's torch ops) see one dtype (autograd casts
    each gradient back to its input's dtype). The C++ node's to_common_dtype
    applies the same rule."""
    dtypes = {t.dtype for t in (grad, z, W, V, B, A)}
    if len(dtypes) == 1:
        return grad, z, W, V, B, A
    dtype = torch.float32
    for d in dtypes:
        dtype = torch.promote_types(dtype, d)
    return tuple(t.to(dtype) for t in (grad, z, W, V, B, A))


def _call_backward(grad, z, W, V, B, A, saved, mask):
    """One call of a fused backward op, by the cheapest route that keeps the
    result differentiable when it has to be. saved: the planned forward's
    (r, q, state), or None for the public backward op (the raw op's face)."""
    grad, z, W, V, B, A = _common_dtype(grad, z, W, V, B, A)
    r, q, state = (None, None, None) if saved is None else saved
    if _torch_private.functorch_transforms_active():
        return TwoLayerSquareBackward.apply(grad, z, W, V, B, A, r, q, state, mask)
    return call_op(fused_backward, grad, z, W, V, B, A, r, q, state, mask)


def planned_forward(z, W, V, B, A, plan, save):
    """The internal forward op (f, r, q, state), as called from inside an autograd.Function."""
    return call_op(_ops._two_layer_square_forward, z, W, V, B, A, plan, save)


def setup_planned_context(ctx, inputs, output):
    z, W, V, B, A, plan, save = inputs
    _, r, q, state = output
    ctx.mark_non_differentiable(r, q, state)
    # r, q and state never receive gradients; without this autograd would hand
    # the backward zero-filled tensors for them on every call.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z, W, V, B, A, r, q, state)
    ctx.save_for_forward(z, W, V, B, A)


def planned_jvp(ctx, *tangents):
    """Forward-mode AD of the planned forward (jvp, jacfwd, hessian): f's tangent;
    r, q and state are not differentiable."""
    z, W, V, B, A = ctx.saved_tensors[:5]
    return tangent_of_f(z, W, V, B, A, tangents[:5]), None, None, None


def planned_backward(ctx, grad, *_not_differentiable):
    """Backward of the planned forward: the internal fused backward op, with the
    plan and the saved r and q of the forward (its state says which)."""
    z, W, V, B, A, r, q, state = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:5])
    if grad is None or not any(mask):  # (grads are not materialised: None means zero)
        return (None,) * 7
    return (*_call_backward(grad, z, W, V, B, A, (r, q, state), mask), None, None)


def double_backward(g, z, W, V, B, A, cotangents, needs):
    """Vector-Jacobian product of the backward map (g, θ) -> ∇_θ Σ g·f(θ), θ = (z, W, V, B, A).

    Its cotangent c lives in θ's space, so (the Hessian being symmetric) the VJP is
    the forward-mode derivative along c: for g it is ∂f/∂θ·c per sample, for θ it is
    the Hessian-vector product H_L c. Written in differentiable torch ops, so higher
    derivatives and torch.func transforms compose. ReLU's mask is held fixed, as
    autograd does.
    """
    d = z.shape[-1]
    z2 = z.reshape(-1, d)
    g1 = g.reshape(-1, 1)
    a = A.reshape(-1)
    # A gradient that was not requested (or not used) has a zero cotangent.
    cz, cW, cV, cB, cA = (
        torch.zeros_like(t) if c is None else c for c, t in zip(cotangents, (z, W, V, B, A))
    )
    cz = cz.reshape(-1, d)
    cA = cA.reshape(-1)

    x = z2 @ W.T
    r = torch.relu(x)
    active = ~(r <= 0)  # torch's threshold_backward: NaN units pass gradients
    u = r @ V.T
    y = u @ B.T
    e = 2 * g1 * a * y
    gu = e @ B
    gx = torch.where(active, gu @ V, 0)

    dx = cz @ W.T + z2 @ cW.T
    dr = torch.where(active, dx, 0)
    du = dr @ V.T + r @ cV.T
    dy = du @ B.T + u @ cB.T
    de = 2 * g1 * (cA * y + a * dy)
    dgu = de @ B + e @ cB
    dgx = torch.where(active, dgu @ V + gu @ cV, 0)

    out = [None] * 6
    if needs[0]:
        out[0] = ((y * y) @ cA + (2 * a * y * dy).sum(-1)).reshape(g.shape)
    if needs[1]:
        out[1] = (dgx @ W + gx @ cW).reshape(z.shape)
    if needs[2]:
        out[2] = dgx.T @ z2 + gx.T @ cz
    if needs[3]:
        out[3] = dgu.T @ r + gu.T @ dr
    if needs[4]:
        out[4] = de.T @ u + e.T @ du
    if needs[5]:
        out[5] = (2 * g1 * y * dy).sum(0).reshape(A.shape)
    return out


# Autocast: the forward ops run on float32 casts of their floating inputs
# (accumulation and the square in float32, f returned in float32); the casts
# are recorded by autograd, so gradients come back in each input's own dtype.
if hasattr(torch.library, "register_autocast"):  # torch >= 2.5
    for _op in ("torchext::two_layer_square", "torchext::_two_layer_square_forward"):
        for _device in ("cpu", "cuda"):
            torch.library.register_autocast(_op, _device, torch.float32)

torch.library.register_autograd(
    "torchext::two_layer_square", backward, setup_context=setup_context
)
torch.library.register_autograd(
    "torchext::two_layer_square_backward",
    _backward_of_backward,
    setup_context=_setup_backward_context,
)
torch.library.register_autograd(
    "torchext::_two_layer_square_forward", planned_backward, setup_context=setup_planned_context
)
torch.library.register_autograd(
    "torchext::_two_layer_square_backward",
    _backward_of_backward,
    setup_context=_setup_backward_context,
)
