"""Inputs for studying the numerics of the plans (used by the tests and
benchmarks/accuracy.py)."""
import torch


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
