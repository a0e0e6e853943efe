"""The public autograd face: `TwoLayerSquare` and the functional `two_layer_square`."""
import torch

from . import _autograd

_ops = torch.ops.torchext
_NAMES = ("z", "W", "V", "B", "A")


def _check_tensors(args):
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
        members = _autograd.unbatched_slices(info, in_dims, (z, W, V, B, A))
        return torch.stack([TwoLayerSquare.apply(*args) for args in members]), 0


def two_layer_square(z, W, V, B, A):
    """f = A · (B · V · relu(W z))² for z of shape (..., d); returns shape z.shape[:-1].

    W: (k, d), V: (m, k), B: (ell, m), A: (1, ell) or (ell,), all of z's dtype and device.
    Differentiable in every input (gradients from one fused backward call).
    """
    return TwoLayerSquare.apply(z, W, V, B, A)


@torch.library.register_vmap("torchext::two_layer_square")
def _forward_vmap(info, in_dims, z, W, V, B, A):
    if all(dim is None for dim in in_dims[1:]):
        return _ops.two_layer_square(z.movedim(in_dims[0], 0), W, V, B, A), 0
    members = _autograd.unbatched_slices(info, in_dims, (z, W, V, B, A))
    return torch.stack([_ops.two_layer_square(*args) for args in members]), 0


@torch.library.register_vmap("torchext::two_layer_square_backward")
def _backward_vmap(info, in_dims, grad, z, W, V, B, A, output_mask):
    members = _autograd.unbatched_slices(info, in_dims[:6], (grad, z, W, V, B, A))
    return _autograd.stack_members([_ops.two_layer_square_backward(*args, output_mask) for args in members])
