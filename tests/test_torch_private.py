"""Each probe of a private PyTorch API (torchext/_torch_private.py) still detects
what torchext's routing relies on, on this torch version."""
import os

import pytest
import torch
import torch._library.autograd as library_autograd
from torch.autograd import forward_ad

import torchext  # noqa: F401  (loads the operators)
from conftest import python_calls_under
from torchext import _torch_private


def test_functorch_transforms_active():
    seen = []

    def probe(x):
        seen.append(_torch_private.functorch_transforms_active())
        return x.sum()

    x = torch.ones(3, 2)
    probe(x)
    torch.func.vmap(probe)(x)
    torch.func.grad(probe)(x)
    torch.func.jvp(probe, (x,), (x,))
    assert seen == [False, True, True, True]


def test_forward_ad_active():
    assert not _torch_private.forward_ad_active()
    with forward_ad.dual_level():
        assert _torch_private.forward_ad_active()
    assert not _torch_private.forward_ad_active()


def test_forward_mode_nested_unsupported():
    seen = []

    def probe(x):
        seen.append(_torch_private.forward_mode_nested_unsupported())
        return (x ** 3).sum()

    x = torch.ones(3)
    func = torch.func
    probe(x)
    func.jvp(probe, (x,), (x,))
    func.hessian(probe)(x)  # jacfwd(jacrev)
    func.jacrev(func.jacrev(probe))(x)
    func.jacrev(func.jacfwd(probe))(x)
    func.jacrev(func.jacrev(func.jacfwd(probe)))(x)
    func.jacfwd(func.jacfwd(probe))(x)
    func.jacrev(func.hessian(probe))(x)
    assert seen == [False, False, False, False, False, False, True, True]


def test_below_autograd_records_nothing():
    x = torch.ones(3, requires_grad=True)
    assert (x * 2).grad_fn is not None
    with _torch_private.below_autograd():
        y = x * 2
    assert y.grad_fn is None and not y.requires_grad
    # ...and leaves grad mode as it found it.
    assert torch.is_grad_enabled() and (x * 2).grad_fn is not None


def test_run_meta_kernel_checks_and_infers_shapes_below_every_transform():
    op = torch.ops.torchext.two_layer_square.default
    shapes = ((5, 3), (4, 3), (2, 4), (6, 2), (1, 6))
    seen = []

    def probe(x):
        # Made inside the transforms, as the eager-composition route makes them.
        meta = [torch.empty(s, device="meta") for s in shapes]
        seen.append(_torch_private.run_meta_kernel(op, *meta).shape)
        with pytest.raises(ValueError, match="A must have shape"):
            _torch_private.run_meta_kernel(op, *meta[:4], meta[4].reshape(-1, 1))
        return (x ** 3).sum()

    x = torch.ones(3)
    probe(x)
    twice = lambda: torch.func.jacfwd(torch.func.jacfwd(probe))(x)  # noqa: E731
    twice()  # (torch.func's first use registers autograd rules of its own)
    # The ops' registered autograd is never entered.
    entered = python_calls_under(twice, os.path.abspath(library_autograd.__file__))
    assert seen == [torch.Size([5])] * 3
    assert entered == []
