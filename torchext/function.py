"""The public autograd face: `TwoLayerSquare` and the functional `two_layer_square`."""
import torch

from . import _autograd, _torch_private

_ops = torch.ops.torchext
_NAMES = ("z", "W", "V", "B", "A")


def _check_tensors(args):
    z, W, V, B, A = args
    Tensor = torch.Tensor
    if isinstance(z, Tensor) and isinstance(W, Tensor) and isinstance(V, Tensor) and isinstance(B, Tensor) \
            and isinstance(A, Tensor):  # the common case, without a generator per call
        return
    for name, value in zip(_NAMES, args):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"two_layer_square: {name} must be a torch.Tensor; got {type(value).__name__}"
            )


class TwoLayerSquare(torch.autograd.Function):
    """f = A · (B · V · relu(W z))², z of shape (..., d), f of shape z.shape[:-1].

    forward calls the fused op; backward calls the fused backward op once for every
    input whose gradient is needed. Works with torch.func (grad, vjp, jacrev, vmap).
    """

    @staticmethod
    def forward(z, W, V, B, A):
        _check_tensors((z, W, V, B, A))
        return _autograd.forward(z, W, V, B, A)

    setup_context = staticmethod(_autograd.setup_context)
    backward = staticmethod(_autograd.backward)

    @staticmethod
    def vmap(info, in_dims, z, W, V, B, A):
        z_dim = in_dims[0]
        if all(dim is None for dim in in_dims[1:]):
            # Only z is batched: the vmapped dimension is just more samples.
            return TwoLayerSquare.apply(z.movedim(z_dim, 0), W, V, B, A), 0
        # Weights batched (an ensemble): one fused call per member.
        return _autograd.per_member(info, in_dims, (z, W, V, B, A), TwoLayerSquare.apply)


class PlannedTwoLayerSquare(torch.autograd.Function):
    """The face behind two_layer_square and TwoLayerSquareNet: forward returns
    (f, r, q, state) from the internal fused forward op with the requested
    plan, and saves them: r and q are two N×k tensors (for narrow layers,
    d + k < 64, they are empty and the backward recomputes them chunk by
    chunk), state is the plan the forward resolved, which every backward of
    it runs. Same backward formula and torch.func support as TwoLayerSquare;
    this twin is the one torch.compile traces."""

    # (*args): autograd.Function.apply binds the arguments to forward's signature
    # on every call, and that costs about twice as much for seven named parameters.
    @staticmethod
    def forward(*args):
        return _autograd.planned_forward(*args)

    setup_context = staticmethod(_autograd.setup_planned_context)
    backward = staticmethod(_autograd.planned_backward)

    @staticmethod
    def vmap(info, in_dims, z, W, V, B, A, plan, save):
        if all(dim is None for dim in in_dims[1:5]):
            # Only z is batched: one forward over every member's samples. Its
            # plan (resolved for all of them) travels in the state to each
            # member's backward.
            zb = z.movedim(in_dims[0], 0)
            f, r, q, state = TorchFuncTwoLayerSquare.apply(zb, W, V, B, A, plan, save)
            rows = zb.shape[1:-1].numel() if state.shape[2] else 0  # state: (0, plan, saved)
            shape = (info.batch_size, rows, r.shape[-1])
            return (f, r.reshape(shape), q.reshape(shape), state), (0, 0, 0, None)
        return _autograd.per_member(
            info, in_dims[:5], (z, W, V, B, A),
            lambda *args: TorchFuncTwoLayerSquare.apply(*args, plan, save), unbatched=(3,))


class TorchFuncTwoLayerSquare(PlannedTwoLayerSquare):
    """PlannedTwoLayerSquare plus forward-mode AD (jvp, jacfwd, hessian), for
    torch.func transforms. Kept apart because Dynamo refuses to trace an
    autograd.Function that defines jvp; under torch.compile the planned face
    itself is used."""

    jvp = staticmethod(_autograd.planned_jvp)


class _PlannedEagerTwoLayerSquare(torch.autograd.Function):
    """The plain-eager twin of PlannedTwoLayerSquare: the same ops, saved tensors
    and backward, but an old-style forward(ctx, ...) — autograd.Function.apply
    then skips binding the arguments to forward's signature, which costs as much
    as the fused kernels at small sizes. Used only outside torch.func transforms
    and torch.compile tracing (those need setup_context)."""

    @staticmethod
    def forward(ctx, z, W, V, B, A, plan, save):
        out = _autograd.planned_forward(z, W, V, B, A, plan, save)
        _autograd.setup_planned_context(ctx, (z, W, V, B, A, plan, save), out)
        return out

    backward = staticmethod(_autograd.planned_backward)
    jvp = staticmethod(_autograd.planned_jvp)


PLANS = ("auto", "direct", "folded", "quadratic")


def two_layer_square(z, W, V, B, A, *, plan="auto"):
    """f = A · (B · V · relu(W z))² for z of shape (..., d); returns shape z.shape[:-1].

    W: (k, d), V: (m, k), B: (ell, m), A: (1, ell) or (ell,), all of z's dtype and device.
    Differentiable in every input (gradients from one fused backward call).

    plan: "auto" (the cheapest association for these sizes, by a cost model of the
    shapes alone), or force "direct" (B(V r), the eager order), "folded"
    (M = B V once per call) or "quadratic" (f = rᵀ Q r with Q = Mᵀ diag(a) M).
    """
    _check_tensors((z, W, V, B, A))
    if plan not in PLANS:
        raise ValueError(f"two_layer_square: plan must be one of {PLANS}; got {plan!r}")
    if torch.compiler.is_compiling():
        face = PlannedTwoLayerSquare
    elif _torch_private.functorch_transforms_active():
        face = TorchFuncTwoLayerSquare
    elif not _torch_private.forward_ad_active():
        # Plain eager, no dual tensors: one C++ autograd node (see
        # csrc/two_layer_square_autograd.cpp), no Python in forward or backward.
        return _ops._two_layer_square_autograd(z, W, V, B, A, plan)
    else:
        face = _PlannedEagerTwoLayerSquare
    # torch.export records an inference graph: nothing saved, so the plan is
    # resolved when the exported program runs, and a dynamic batch stays dynamic.
    save = torch.is_grad_enabled() and not torch.compiler.is_exporting() and (
        z.requires_grad or W.requires_grad or V.requires_grad or B.requires_grad or A.requires_grad
    )
    return face.apply(z, W, V, B, A, plan, save)[0]


@torch.library.register_vmap("torchext::two_layer_square")
def _forward_vmap(info, in_dims, z, W, V, B, A):
    if all(dim is None for dim in in_dims[1:]):
        return _ops.two_layer_square(z.movedim(in_dims[0], 0), W, V, B, A), 0
    return _autograd.per_member(info, in_dims, (z, W, V, B, A), _ops.two_layer_square)


@torch.library.register_vmap("torchext::two_layer_square_backward")
def _backward_vmap(info, in_dims, grad, z, W, V, B, A, output_mask):
    return _autograd.per_member(info, in_dims, (grad, z, W, V, B, A),
                                lambda *args: _ops.two_layer_square_backward(*args, output_mask))


# torch.func.vmap over the backward of a graph that the plain-eager C++ node
# recorded (the legacy vmap of is_grads_batched has its own kernel in C++).
@torch.library.register_vmap("torchext::_two_layer_square_backward")
def _internal_backward_vmap(info, in_dims, grad, z, W, V, B, A, r, q, state, output_mask):
    _autograd.check_unbatched_state(in_dims, 8)
    return _autograd.per_member(
        info, in_dims[:8], (grad, z, W, V, B, A, r, q),
        lambda *args: _ops._two_layer_square_backward(*args, state, output_mask))
