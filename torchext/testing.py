"""For tests and benchmarks: the test-only ops, what autograd saves for a
call, and inputs for studying the numerics of the plans
(benchmarks/accuracy.py)."""
import ctypes

import torch

from . import _library


def cancelling_inputs(n=256, d=12, k=8, ell=6, scale=1e4, seed=0, dtype=torch.float32):
    """(z, W, V, B, A) on which the head cancels: A has mixed signs and
    |y| ≪ ‖B‖‖V r‖. M = B V has rows s·(e₀ − e₁) + O(1) and W's first two rows
    almost agree, so y = M r = s (r₀ − r₁) + O(1) for every sample while each
    term is O(s). The direct association (eager's) loses what eager loses; the
    folded and quadratic forms lose more (Q = Mᵀ diag(a) M carries s² terms)."""
    gen = torch.Generator().manual_seed(seed)
    opts = {"generator": gen, "dtype": torch.float64}
    z = torch.randn(n, d, **opts)
    W = torch.randn(k, d, **opts) / d ** 0.5
    W[1] = W[0] + 1e-5 * torch.randn(d, **opts)
    V = torch.randn(k, k, **opts) / k ** 0.5 + 2 * torch.eye(k, dtype=torch.float64)  # m = k, invertible
    M = torch.randn(ell, k, **opts)
    M[:, 0] += scale
    M[:, 1] -= scale
    B = M @ torch.linalg.inv(V)
    A = torch.where(torch.arange(ell) % 2 == 0, 1.0, -1.0).to(torch.float64).reshape(1, ell)
    return [t.to(dtype) for t in (z, W, V, B, A)]


def saved_tensors(fn):
    """fn()'s result and the tensors autograd saved while it ran, in order."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def load_testing_ops():
    """Registers the test-only ops (once) and returns their namespace,
    torch.ops.torchext_testing: `_plan` (which plan a call with given sizes
    runs), `_cpu_split` (how the CPU backend splits it into chunks and
    partitions), `_two_layer_square_{forward,backward}_aten` (the CUDA backend's
    device-generic algorithm, for CPU tensors), `_cpu_matmul` (the CPU
    kernels' product), `_noop_node` (the benchmark's C++ node floor: an
    autograd node called and saving as the plain-eager route's does, with
    nothing of the route's own inside), `_poison_uninitialized` (NaN-fill
    every buffer the kernels must write before reading) and `_cuda_reread_switches` (read TORCHEXT_CUDA_KERNELS
    again). They are not in torch.ops.torchext."""
    register = _library._LIB.torchext_register_testing_ops
    register.restype = ctypes.c_char_p
    error = register()
    if error is not None:
        raise RuntimeError(f"torchext: the test-only ops could not be registered: {error.decode()}")
    return torch.ops.torchext_testing
