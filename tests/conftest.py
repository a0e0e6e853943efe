import contextlib
import os
import sys
import zlib

import pytest
import torch

import torchext  # noqa: F401  (loads the operators)
from torchext.testing import load_testing_ops

TESTING = load_testing_ops()  # torch.ops.torchext_testing

HAS_CUDA = torch.cuda.is_available() and torchext.build_info()["cuda_kernels"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and CUDA kernels"))]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and CUDA kernels")

@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    """Every draw from torch's global generator is seeded from the test's id,
    so a failure reproduces (crc32: stable across processes, unlike hash())."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# (batch shape of z, d, k, m, ell): ones, primes, z as a vector, two leading
# dims, an empty batch, wide layers, and a batch long enough for several
# chunks and partitions of the kernels' batch plan.
SHAPES = {
    "small": ((5,), 7, 3, 4, 6),
    "vector": ((), 16, 16, 16, 16),
    "ones": ((1,), 1, 1, 1, 1),
    "primes": ((13,), 11, 7, 5, 3),
    "two-leading": ((3, 4), 5, 6, 7, 2),
    "empty-batch": ((0,), 5, 4, 3, 2),
    "wide": ((9,), 33, 65, 17, 129),
    "ell-gt-k": ((31,), 8, 4, 9, 40),
    "many-chunks": ((3001,), 8, 8, 8, 8),
}


def make_inputs(shape, dtype=torch.float64, device="cpu", seed=0, a_vector=False):
    """Fresh random (z, W, V, B, A) of the given shape set; A has mixed signs."""
    batch, d, k, m, ell = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    z = rnd(*batch, d)
    W = rnd(k, d, scale=d ** -0.5 if d else 1.0)
    V = rnd(m, k, scale=k ** -0.5 if k else 1.0)
    B = rnd(ell, m, scale=m ** -0.5 if m else 1.0)
    A = rnd(ell) if a_vector else rnd(1, ell)
    return z, W, V, B, A


@contextlib.contextmanager
def poisoned_buffers():
    """Inside, every buffer the kernels must write before reading it (outputs,
    gradient buffers, partials, Grams, per-thread scratch) starts as NaN, so an
    element a kernel never wrote shows, whatever memory the allocator reuses."""
    sample = TESTING._poison_uninitialized(True)
    try:
        assert sample.isnan().all(), "the kernels' buffers are not poisoned"
        yield
    finally:
        TESTING._poison_uninitialized(False)


def rel_err(actual, expected):
    """‖actual − expected‖₂ / ‖expected‖₂ in float64 (absolute when expected is 0)."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    den = e.norm().item()
    num = (a - e).norm().item()
    return num / den if den > 0 else num


# Relative tolerance against the float64 reference, by dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def assert_matches(actual, expected, dtype, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.1g}"


def reference_outputs(inputs, grad_seed=1, wants=(True,) * 5, g=None):
    """f and the gradients (of Σ g·f; g random from grad_seed unless given)
    from the eager reference in float64."""
    from torchext import reference

    leaves = [t.detach().double().cpu().requires_grad_(w) for t, w in zip(inputs, wants)]
    f = reference.two_layer_square(*leaves)
    if g is None:
        g = torch.randn(f.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    g = g.double().cpu()
    req = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(f, req, g, allow_unused=True) if req else ()
    it = iter(grads)
    full = [next(it) if w else None for w in wants]
    full = [torch.zeros_like(t) if (w and gr is None) else gr for t, w, gr in zip(leaves, wants, full)]
    return f.detach(), g, full


def fused_outputs(inputs, g, wants=(True,) * 5, plan="auto"):
    """f and the requested gradients (of Σ g·f) from torchext.two_layer_square."""
    # detach(), not clone(): a clone would make every view contiguous again.
    leaves = [t.detach().requires_grad_(w) for t, w in zip(inputs, wants)]
    f = torchext.two_layer_square(*leaves, plan=plan)
    req = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(f, req, g.to(f.dtype).to(f.device)) if req else ())
    return f, [next(grads) if w else None for w in wants]


def eager_outputs(inputs, g):
    """f and all five gradients from the eager reference, in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    f = torchext.reference.two_layer_square(*leaves)
    return f, list(torch.autograd.grad(f, leaves, g.to(device=f.device, dtype=f.dtype)))


def python_calls_in_torchext(fn):
    """The names of the torchext Python functions that fn() entered (on this
    thread, where the autograd engine runs CPU backwards)."""
    return python_calls_under(fn, os.path.dirname(os.path.abspath(torchext.__file__)) + os.sep)


def python_calls_under(fn, path):
    """The names of the Python functions defined in files under path (a
    directory ending in a separator, or a file) that fn() entered, on this thread."""
    calls = []

    def profile(frame, event, arg):
        if event == "call" and os.path.abspath(frame.f_code.co_filename).startswith(path):
            calls.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def cpu_kernel_sets_this_cpu_runs():
    """The SIMD kernel sets this CPU can run, from /proc/cpuinfo's flags (Linux;
    aarch64 always has NEON), and "generic"; None where that cannot be told."""
    import platform
    if platform.machine() in ("aarch64", "arm64"):
        return {"neon", "generic"}
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        return None
    return {"generic"} | ({"avx512"} if "avx512f" in flags else set()) | ({"avx2"} if {"avx2", "fma"} <= flags else set())
