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


def forward_mode_nested_unsupported() -> bool:
    """The functorch stack nests forward mode where an autograd.Function's jvp
    cannot serve it: a forward-mode level (jvp, jacfwd) inside another
    (jacfwd(jacfwd(f)), jvp(jvp(f))), or between two grad levels
    (jacrev(hessian(f))).

    Why: the tangent a Function's jvp returns is not differentiated by an
    outer forward level (torch gives zeros), and under a grad level on both
    sides torch refuses the Function; there torchext computes through
    differentiable torch ops instead. One forward level under grad levels only
    (jacrev(jacfwd(f))) or over them (hessian) works through the Functions.
    The functorch interpreter stack, outermost first."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    jvp_seen = grad_outside = False
    for interpreter in retrieve_all_functorch_interpreters():
        kind = interpreter.key()
        if kind == TransformType.Jvp:
            if jvp_seen:
                return True
            jvp_seen = True
        elif kind == TransformType.Grad:
            if jvp_seen and grad_outside:
                return True
            grad_outside = grad_outside or not jvp_seen
    return False


def run_meta_kernel(op: torch._ops.OpOverload, *args):
    """op's Meta kernel on meta tensors, dispatched to that kernel alone.

    Why: the eager-composition route runs the ops' shape and dtype checks
    (their one source, the Meta kernel; the route compares devices itself)
    inside torch.func transforms. A plain call would pass the transform
    levels and, at each, the op's registered autograd (a Python frame) on the
    way down, and again as the check's error unwinds: under
    jacfwd(jacfwd(f)), three such frames. On the H200 machine (torch 2.11)
    that nesting segfaulted as a bad shape's error unwound. Dynamo cannot
    trace the redispatch; under torch.compile the checks run once, as it
    traces the plain call."""
    if torch.compiler.is_compiling():
        return op(*args)
    return op.redispatch(_META_KEYS, *args)


_META_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.Meta)
