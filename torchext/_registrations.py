"""The rules of every op in torch.ops.torchext, each written once and
registered on the op through torch.library: autograd (the fused backward op,
and the backward's own derivative in closed form, `double_backward`), vmap
(one per-member rule), autocast (float32), and the dtype policy of a backward
whose forward ran under autocast.

Custom ops cannot carry forward-mode derivatives, so forward mode (jvp,
jacfwd, hessian, dual tensors) needs autograd.Functions: the two here add a
jvp to the planned forward op and to the backward ops, and nothing else
(their vmap rules are the ops' own)."""
import contextlib

import torch

from . import _library  # noqa: F401  (loads the operators)
from . import _torch_private

_ops = torch.ops.torchext


# ---- how an op is called from inside a Function or a backward ----------------

def plain_eager():
    """True outside torch.func transforms and torch.compile tracing: then the
    caller (a Function, a first-order backward) has already taken care of
    autograd, and the op can be called below the Autograd key, skipping its
    (redundant) registered autograd layer — a large share of the call
    overhead at small sizes."""
    return not (_torch_private.functorch_transforms_active() or torch.compiler.is_compiling())


def call_op(op, *args):
    """Calls a compiled op (or a function of one); below the Autograd key when
    nothing is to be recorded (grad mode off, plain eager). Otherwise
    (create_graph=True, compile tracing, torch.func) through it, so the op's
    registered formula is recorded."""
    if not torch.is_grad_enabled() and plain_eager():
        with _torch_private.below_autograd():
            return op(*args)
    return op(*args)


# ---- autocast ------------------------------------------------------------------
# The forward ops run on float32 casts of their floating inputs (accumulation
# and the square in float32, f returned in float32); the casts are recorded by
# autograd, so gradients come back in each input's own dtype.
# `_two_layer_square_autograd` (the C++ node) is cast on entry like the others,
# so the node saves the float32 casts and its backward sees one dtype.
AUTOCAST_OPS = ("two_layer_square", "_two_layer_square_forward", "_two_layer_square_autograd")
AUTOCAST_DEVICES = ("cpu", "cuda")  # the devices the ops have kernels for


def autocast_enabled(device_type):
    """Whether autocast is on for this device type (never on a device the ops
    register no autocast rule for; see autocast_off for why a device list)."""
    return device_type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


def autocast_off(device_type):
    """Autocast off on this device type, for derivatives written in torch ops:
    they compute in the dtype the op computed in (float32 under autocast), as
    the kernels do, not in autocast's low precision. (A device without
    autocast, meta say, cannot even name it to turn it off; nor can Dynamo in
    torch 2.9 trace torch.amp.is_autocast_available, hence the device list.)"""
    return torch.autocast(device_type, enabled=False) if device_type in AUTOCAST_DEVICES \
        else contextlib.nullcontext()


def common_dtype(grad, z, W, V, B, A):
    """A Function saves the inputs it was given, but under autocast its forward
    op ran on float32 casts of them and returned f in float32: bring the
    incoming gradient and the inputs to one dtype again, so that the backward
    and its own derivative (double_backward's torch ops) see one dtype
    (autograd casts each gradient back to its input's dtype)."""
    dtypes = {t.dtype for t in (grad, z, W, V, B, A)}
    if len(dtypes) == 1:
        return grad, z, W, V, B, A
    dtype = torch.float32
    for d in dtypes:
        dtype = torch.promote_types(dtype, d)
    return tuple(t.to(dtype) for t in (grad, z, W, V, B, A))


# ---- autograd of the forward ops ------------------------------------------------

def fused_backward(grad, z, W, V, B, A, r, q, state, mask):
    """The internal backward op with a planned forward's r, q and state (the
    state holds its plan; r and q are empty where the backward recomputes them
    chunk by chunk), or, with all three None, the public backward op."""
    if state is None:
        return _ops.two_layer_square_backward(grad, z, W, V, B, A, mask)
    return _ops._two_layer_square_backward(grad, z, W, V, B, A, r, q, state, mask)


def call_backward(grad, z, W, V, B, A, saved, mask):
    """One call of a fused backward op, by the cheapest route that keeps the
    result differentiable when it has to be (under torch.func, in forward
    mode too). saved: the planned forward's (r, q, state), or None."""
    grad, z, W, V, B, A = common_dtype(grad, z, W, V, B, A)
    r, q, state = (None, None, None) if saved is None else saved
    # Dual tensors may reach the backward (forward over reverse) under torch.func
    # and inside a dual level: only the Function carries their tangents.
    if _torch_private.functorch_transforms_active() or _torch_private.forward_ad_active():
        return fused_backward_with_jvp(grad, z, W, V, B, A, r, q, state, *mask)
    return call_op(fused_backward, grad, z, W, V, B, A, r, q, state, mask)


def setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def backward(ctx, grad):
    """The public forward's: every requested gradient from one fused backward
    call (r and q recomputed), None for the rest."""
    z, W, V, B, A = ctx.saved_tensors
    mask = [bool(b) for b in ctx.needs_input_grad[:5]]
    if not any(mask):
        return (None,) * 5
    return tuple(call_backward(grad, z, W, V, B, A, None, mask))


def setup_planned_context(ctx, inputs, output):
    z, W, V, B, A, plan, save = inputs
    _, r, q, state = output
    ctx.mark_non_differentiable(r, q, state)
    # r, q and state never receive gradients; without this autograd would hand
    # the backward zero-filled tensors for them on every call.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z, W, V, B, A, r, q, state)
    ctx.save_for_forward(z, W, V, B, A)
    ctx.f_dtype = output[0].dtype  # float32 under autocast, whatever the inputs


def planned_backward(ctx, grad, *_not_differentiable):
    """The planned forward's: the internal fused backward op, with the plan and
    the saved r and q of the forward (its state says which)."""
    z, W, V, B, A, r, q, state = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:5])
    if grad is None or not any(mask):  # (grads are not materialised: None means zero)
        return (None,) * 7
    return (*call_backward(grad, z, W, V, B, A, (r, q, state), mask), None, None)


# ---- autograd of the backward ops -----------------------------------------------

def setup_backward_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])  # grad, z, W, V, B, A


def backward_of_backward(ctx, *cotangents):
    """Autograd of either backward op (their first six inputs are grad, z, W, V,
    B, A; the rest — saved r, q, state, mask — get no gradient)."""
    grad, z, W, V, B, A = ctx.saved_tensors[:6]
    grads = double_backward(grad, z, W, V, B, A, cotangents, ctx.needs_input_grad[:6])
    return (*grads, *[None] * (len(ctx.needs_input_grad) - 6))


def double_backward(g, z, W, V, B, A, cotangents, needs):
    """Vector-Jacobian product of the backward map (g, θ) -> ∇_θ Σ g·f(θ), θ = (z, W, V, B, A).

    Its cotangent c lives in θ's space, so (the Hessian being symmetric) the VJP is
    the forward-mode derivative along c: for g it is ∂f/∂θ·c per sample, for θ it is
    the Hessian-vector product H_L c. Written in differentiable torch ops, so higher
    derivatives and torch.func transforms compose. ReLU's mask is held fixed, as
    autograd does. Half arguments are computed in float32, as the ops compute
    them, each result returned in its argument's dtype; autocast is off inside
    (see autocast_off).
    """
    args = (g, z, W, V, B, A)
    with autocast_off(z.device.type):
        out = _double_backward(*map(widened, args), [None if c is None else widened(c) for c in cotangents],
                               needs)
    return [o if o is None else o.to(t.dtype) for o, t in zip(out, args)]


def widened(t):
    """t in float32 if it is half (float16, bfloat16): the dtype the ops compute half inputs in."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def twice(t):
    """2t as t + t, as eager's y * y differentiates: 2 · (g a) overflows
    first where (g a) y does not (g near the dtype's limit), and inf · 0 is
    NaN. Doubling is exact otherwise: the same bits as 2 * t."""
    return t + t


def _double_backward(g, z, W, V, B, A, cotangents, needs):
    d = z.shape[-1]
    z2 = z.reshape(z.shape[:-1].numel(), d)  # (not -1: d may be 0)
    g1 = g.reshape(-1, 1)
    a = A.reshape(-1)
    # A gradient that was not requested (or not used) has a zero cotangent.
    cz, cW, cV, cB, cA = (
        torch.zeros_like(t) if c is None else c for c, t in zip(cotangents, (z, W, V, B, A))
    )
    cz = cz.reshape(z2.shape)
    cA = cA.reshape(-1)

    x = z2 @ W.T
    r = torch.relu(x)
    active = ~(r <= 0)  # torch's threshold_backward: NaN units pass gradients
    u = r @ V.T
    y = u @ B.T
    e = twice(g1 * a * y)
    gu = e @ B
    gx = torch.where(active, gu @ V, 0)

    dx = cz @ W.T + z2 @ cW.T
    dr = torch.where(active, dx, 0)
    du = dr @ V.T + r @ cV.T
    dy = du @ B.T + u @ cB.T
    de = twice(g1 * (cA * y + a * dy))
    dgu = de @ B + e @ cB
    dgx = torch.where(active, dgu @ V + gu @ cV, 0)

    out = [None] * 6
    if needs[0]:
        out[0] = ((y * y) @ cA + twice((a * y * dy).sum(-1))).reshape(g.shape)
    if needs[1]:
        out[1] = (dgx @ W + gx @ cW).reshape(z.shape)
    if needs[2]:
        out[2] = dgx.T @ z2 + gx.T @ cz
    if needs[3]:
        out[3] = dgu.T @ r + gu.T @ dr
    if needs[4]:
        out[4] = de.T @ u + e.T @ du
    if needs[5]:
        out[5] = twice((g1 * y * dy).sum(0)).reshape(A.shape)
    return out


# ---- forward mode: the two Functions custom ops cannot replace ----------------

def tangent_of_f(z, W, V, B, A, tangents):
    """Forward-mode derivative of f along the input tangents (None = 0): the
    directional derivative that double_backward also gives for the incoming
    gradient's slot."""
    ones = z.new_ones(z.shape[:-1])
    needs = (True, False, False, False, False, False)
    return double_backward(ones, z, W, V, B, A, tangents, needs)[0]


def uncompiled(fn):
    """fn, never compiled by Dynamo: the planned Function's vmap rule, and the
    Function a backward applies under torch.func. A transform applied to a
    compiled function (vmap(torch.compile(f))) can leave that frame to eager
    and compile the frames nested in it instead, which Dynamo cannot trace (an
    internal error on the Function's context). Inside a compiled region
    two_layer_square's routes never reach them. torch.compiler.disable is
    applied on the first call: it imports torch._dynamo (about a second)."""
    disabled = None

    def call(*args):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args)

    return call


class PlannedForwardWithJvp(torch.autograd.Function):
    """The internal forward op (f, r, q, state) with the op's own backward,
    plus forward-mode AD (jvp, jacfwd, hessian, dual tensors): the route of
    torchext.two_layer_square under torch.func transforms and forward-mode AD.
    Under torch.compile the op is called directly (Dynamo refuses to trace a
    Function that defines jvp)."""

    # (*args): autograd.Function.apply binds the arguments to forward's signature
    # on every call, and that costs about twice as much for seven named parameters.
    @staticmethod
    def forward(*args):
        return call_op(_ops._two_layer_square_forward, *args)

    setup_context = staticmethod(setup_planned_context)
    backward = staticmethod(planned_backward)

    @staticmethod
    def jvp(ctx, *tangents):
        # f's tangent; r, q and state are not differentiable.
        # As the op ran: under autocast, on float32 casts of the inputs, and
        # with autocast off inside (it would run these products in low precision).
        device = ctx.saved_tensors[0].device.type
        cast = [None if t is None else t.to(ctx.f_dtype) for t in (*ctx.saved_tensors[:5], *tangents[:5])]
        with autocast_off(device):
            return tangent_of_f(*cast[:5], cast[5:]), None, None, None

    # The op's rule, applying this Function (see forward_vmap).
    vmap = staticmethod(uncompiled(lambda info, in_dims, *args: planned_forward_vmap(
        info, in_dims, *args, forward=PlannedForwardWithJvp.apply)))


class FusedBackwardWithJvp(torch.autograd.Function):
    """Either fused backward op (see fused_backward) with its registered
    reverse-mode derivative, plus forward mode: forward over reverse
    (hessian, jacfwd(jacrev)) under torch.func."""

    generate_vmap_rule = True  # from the backward ops' vmap rules

    # (*output_mask: five bools, each its own argument, as the generated vmap
    # rule gives each argument one in_dim.)
    @staticmethod
    def forward(grad, z, W, V, B, A, r, q, state, *output_mask):
        return fused_backward(grad, z, W, V, B, A, r, q, state, list(output_mask))

    @staticmethod
    def setup_context(ctx, inputs, output):
        # The same tensors for both: a generated vmap rule keeps one record of
        # what was saved.
        ctx.save_for_backward(*inputs[:9])
        ctx.save_for_forward(*inputs[:9])
        ctx.output_mask = list(inputs[9:])

    backward = staticmethod(backward_of_backward)

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


fused_backward_with_jvp = uncompiled(FusedBackwardWithJvp.apply)

# ---- vmap: one rule, per member ----------------------------------------------------

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


def only_z_batched(in_dims, z):
    """Only z is batched, and each member has a sample axis; 0-dim members
    go one by one to the op, whose check says what z must be (read as one
    batch, the vmapped dimension would pass for d)."""
    return all(dim is None for dim in in_dims[1:5]) and z.dim() > 1


# The forwards' rules serve the op and the Function that wraps it alike
# (`forward`: the op, or the Function's apply). When only z is batched, the
# vmapped dimension is just more samples: one call, one level down, so a
# Function records one node and its backward runs once for every member
# (grad(vmap(f))); a rule generated from the op's would run the backward under
# vmap, once per member.
def forward_vmap(info, in_dims, z, W, V, B, A, forward=_ops.two_layer_square):
    if only_z_batched(in_dims, z):
        return forward(z.movedim(in_dims[0], 0), W, V, B, A), 0
    return per_member(info, in_dims, (z, W, V, B, A), forward)


# (plan and save_for_backward: torch leaves out trailing arguments that equal
# their schema default.)
def planned_forward_vmap(info, in_dims, z, W, V, B, A, plan="auto", save_for_backward=False,
                         forward=_ops._two_layer_square_forward):
    save = save_for_backward
    if only_z_batched(in_dims, z):
        # One forward over every member's samples. Its plan (resolved for all
        # of them) travels in the state to each member's backward.
        zb = z.movedim(in_dims[0], 0)
        f, r, q, state = forward(zb, W, V, B, A, plan, save)
        rows = zb.shape[1:-1].numel() if state.shape[2] else 0  # state: (0, plan, saved)
        shape = (info.batch_size, rows, r.shape[-1])
        return (f, r.reshape(shape), q.reshape(shape), state), (0, 0, 0, None)
    return per_member(info, in_dims[:5], (z, W, V, B, A),
                      lambda *args: forward(*args, plan, save), unbatched=(3,))


def backward_vmap(info, in_dims, grad, z, W, V, B, A, output_mask):
    return per_member(info, in_dims[:6], (grad, z, W, V, B, A),
                      lambda *args: _ops.two_layer_square_backward(*args, output_mask))


def planned_backward_vmap(info, in_dims, grad, z, W, V, B, A, r, q, state, output_mask):
    if in_dims[8] is not None:
        raise ValueError("two_layer_square: the state of a forward cannot be batched under vmap")
    return per_member(info, in_dims[:8], (grad, z, W, V, B, A, r, q),
                      lambda *args: _ops._two_layer_square_backward(*args, state, output_mask))


# ---- registration ----------------------------------------------------------------
# (torch.autograd.grad(..., is_grads_batched=True) runs under the legacy vmap,
# which takes no Python rule: the backward ops' Batched kernels, in
# csrc/autograd/two_layer_square_autograd.cpp, call them per member alike.)

RULES = {  # op: (backward, setup_context, vmap rule)
    "two_layer_square": (backward, setup_context, forward_vmap),
    "two_layer_square_backward": (backward_of_backward, setup_backward_context, backward_vmap),
    "_two_layer_square_forward": (planned_backward, setup_planned_context, planned_forward_vmap),
    "_two_layer_square_backward": (backward_of_backward, setup_backward_context, planned_backward_vmap),
}

for _name, (_backward, _setup, _vmap) in RULES.items():
    torch.library.register_autograd(f"torchext::{_name}", _backward, setup_context=_setup)
    torch.library.register_vmap(f"torchext::{_name}", _vmap)

for _name in AUTOCAST_OPS:
    for _device in AUTOCAST_DEVICES:
        torch.library.register_autocast(f"torchext::{_name}", _device, torch.float32)
