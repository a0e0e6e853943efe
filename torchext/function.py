"""The public autograd face: `TwoLayerSquare` and the functional `two_layer_square`."""
import torch

from . import _library, _registrations, _torch_private, reference

_ops = torch.ops.torchext
_NAMES = ("z", "W", "V", "B", "A")
PLANS = ("auto", "direct", "folded", "quadratic")


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


def _check_not_nested(args):
    """Nested tensors of the jagged layout are Python subclasses: their own
    dispatch refuses the ops without naming the argument. (The plain-eager
    route's C++ checks them; the ops' checks name every other layout.)"""
    for name, t in zip(_NAMES, args):
        if t.is_nested:
            raise TypeError(f"two_layer_square: {name} must be a dense (strided) tensor; got a nested tensor")


def _eager_composition(z, W, V, B, A):
    """f by the reference's torch ops, with the ops' shape, dtype and device
    checks and dtype policy: half inputs computed in float32 (f returned in
    their dtype, or in float32 under autocast, with autocast off inside)."""
    device = z.device.type
    autocast = _registrations.autocast_enabled(device)
    inputs = (z, W, V, B, A)
    if autocast:  # as the ops' autocast rule casts them
        inputs = tuple(t.float() if t.is_floating_point() and t.dtype != torch.float64 else t for t in inputs)
    # Devices, which meta copies cannot show (checks.cpp's words; before the
    # shapes, as there), then the op's own checks on its Meta kernel.
    for name, t in zip(_NAMES[1:], inputs[1:]):
        if t.device != z.device:
            raise RuntimeError(f"two_layer_square: {name} must be on the same device as z ({z.device}); "
                               f"got {t.device}")
    _torch_private.run_meta_kernel(_ops.two_layer_square.default,
                                   *(torch.empty(t.shape, dtype=t.dtype, device="meta") for t in inputs))
    # A TORCHEXT_CPU_KERNELS choice that cannot run refuses this route too,
    # as the CPU kernels refuse every non-empty batch (the constant tested
    # first: no guard on the batch size where there is no error).
    if _library.CPU_KERNEL_SET_ERROR and device == "cpu" and z.shape[:-1].numel() > 0:
        raise RuntimeError(f"torchext: {_library.CPU_KERNEL_SET_ERROR}")
    with _registrations.autocast_off(device):
        f = reference.two_layer_square(*map(_registrations.widened, inputs))
    return f if autocast else f.to(z.dtype)


class TwoLayerSquare(torch.autograd.Function):
    """f = A · (B · V · relu(W z))², z of shape (..., d), f of shape z.shape[:-1].

    forward calls the fused op; backward calls the fused backward op once for every
    input whose gradient is needed. Works with torch.func (grad, vjp, jacrev, vmap)
    and torch.compile; forward mode goes through `two_layer_square` (a Function
    with jvp could not be traced by Dynamo).
    """

    @staticmethod
    def forward(z, W, V, B, A):
        _check_tensors((z, W, V, B, A))
        _check_not_nested((z, W, V, B, A))
        if torch.compiler.is_compiling() and _torch_private.forward_ad_active():
            # Eager PyTorch refuses forward mode through a Function without
            # jvp; a traced one would give a zero tangent instead.
            raise NotImplementedError(
                "TwoLayerSquare has no jvp (forward mode): use torchext.two_layer_square")
        return _registrations.call_op(_ops.two_layer_square, z, W, V, B, A)

    setup_context = staticmethod(_registrations.setup_context)
    backward = staticmethod(_registrations.backward)
    # The op's rule, applying this Function.
    vmap = staticmethod(lambda info, in_dims, *args: _registrations.forward_vmap(
        info, in_dims, *args, forward=TwoLayerSquare.apply))


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
    compiling = torch.compiler.is_compiling()
    transforms = _torch_private.functorch_transforms_active()
    forward_mode = _torch_private.forward_ad_active()
    if not compiling and not transforms and not forward_mode:
        # Plain eager, no dual tensors: one C++ autograd node (see
        # csrc/autograd/two_layer_square_autograd.cpp), no Python in forward or backward.
        return _ops._two_layer_square_autograd(z, W, V, B, A, plan)
    _check_not_nested((z, W, V, B, A))
    if (compiling and (transforms or forward_mode)) or \
            (transforms and _torch_private.forward_mode_nested_unsupported()):
        # Where neither the ops nor the Functions give every derivative: the
        # ops carry no forward mode (Dynamo traces the op under jvp, and its
        # tangent would be zero), Dynamo cannot trace the Functions' rules
        # under torch.func, and a Function's jvp is not differentiated by an
        # outer forward level. Differentiable torch ops give them all.
        return _eager_composition(z, W, V, B, A)
    # The planned forward saves r and q for its backward. torch.export records
    # an inference graph: nothing saved, so the plan is resolved when the
    # exported program runs, and a dynamic batch stays dynamic.
    save = torch.is_grad_enabled() and not torch.compiler.is_exporting() and (
        z.requires_grad or W.requires_grad or V.requires_grad or B.requires_grad or A.requires_grad
    )
    if compiling:  # the op's registered autograd; no Function for Dynamo to trace
        return _ops._two_layer_square_forward(z, W, V, B, A, plan, save)[0]
    return _registrations.PlannedForwardWithJvp.apply(z, W, V, B, A, plan, save)[0]
