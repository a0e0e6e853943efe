"""torchext: the fused operator f = A · (B · V · relu(W z))² for PyTorch.

    torchext.two_layer_square(z, W, V, B, A)    functional form
    torchext.TwoLayerSquare.apply(z, W, V, B, A) autograd.Function (torch.func-ready)
    torchext.TwoLayerSquareNet(d, k, m, ell)     drop-in nn.Module
    torchext.reference.two_layer_square          eager composition (the oracle)
    torch.ops.torchext.two_layer_square / two_layer_square_backward   the compiled ops
"""
from . import _registrations, reference  # noqa: F401  (_registrations: the ops' autograd, vmap, autocast)
from ._library import build_info
from .function import TwoLayerSquare, two_layer_square
from .module import TwoLayerSquareNet

__version__ = "0.1.0"
__all__ = ["TwoLayerSquare", "TwoLayerSquareNet", "build_info", "reference", "two_layer_square"]
