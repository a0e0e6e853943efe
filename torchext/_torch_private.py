"""Every probe of a private PyTorch API that torchext's routing depends on, in one
place. Each says what it detects and why torchext needs to know;
tests/test_torch_private.py checks each on every torch version CI runs, so a
torch release that changes one fails there, not as a wrong route elsewhere.
The two that plain eager calls on every call are torch's own functions, bound
here, not wrapped: no extra Python frame on that path.

(The C++ side has one more: csrc/autograd/two_layer_square_autograd.cpp includes
ATen/LegacyVmapTransforms.h for the Batched kernels that
`autograd.grad(..., is_grads_batched=True)` dispatches to; the
is_grads_batched tests cover it.)
"""
import torch
from torch.autograd import forward_ad as _forward_ad

# functorch_transforms_active() -> bool: inside a torch.func transform (vmap,
# grad, jacrev, jvp, ...). Why: the plain-eager C++ autograd node records
# nothing functorch can see through, and a call below the Autograd key would
# skip the transform's own levels; under a transform torchext routes through
# autograd.Functions and the ops' registered autograd instead.
functorch_transforms_active = torch._C._are_functorch_transforms_active

# below_autograd(): a context in which ops dispatch below the Autograd key
# (nothing recorded). Why: inside an autograd.Function's forward, or a
# first-order backward, autograd is already handled; going through the ops'
# registered autograd layer again only adds per-call overhead, a large share
# of the cost at small sizes.
below_autograd = torch._C._AutoDispatchBelowAutograd


def forward_ad_active() -> bool:
    """Inside a `torch.autograd.forward_ad.dual_level()` (dual tensors may flow).

    Why: custom ops cannot carry forward-mode derivatives, so with dual
    tensors around the call goes through an autograd.Function that defines
    jvp, not through the C++ node."""
    return _forward_ad._current_level >= 0


def forward_mode_under_another_level() -> bool:
    """A forward-mode level of torch.func (jvp, jacfwd, hessian's outer
    level) has another differentiating level (jvp or grad) outside it, as in
    jacfwd(jacfwd(f)), jvp(jvp(f)), jacrev(jacfwd(f)) or jacrev(hessian(f)).

    Why: the tangent an autograd.Function's jvp returns is not differentiated
    by an outer level (torch gives zeros there, or refuses the Function under
    an outer grad), so torchext computes these through differentiable torch
    ops instead. The functorch interpreter stack, outermost first."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    differentiating = (TransformType.Grad, TransformType.Jvp)
    outer = False
    for interpreter in retrieve_all_functorch_interpreters():
        kind = interpreter.key()
        if kind == TransformType.Jvp and outer:
            return True
        outer = outer or kind in differentiating
    return False
