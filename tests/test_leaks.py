"""Long runs keep memory flat: the bytes malloc has handed out (exact, where
RSS moves by pages and with the allocator's whims) and the live tensors count
the same after 3,000 more calls as before them."""
import ctypes
import gc
import sys

import pytest
import torch

import torchext


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_bytes_in_use():
    """Bytes in use from glibc's malloc, every arena: small blocks plus mmapped ones."""
    if not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("needs glibc's mallinfo2 (glibc 2.33 or newer)")
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def steps(face, net, z):
    if face == "inference":
        with torch.no_grad():
            net(z)
        return
    net.zero_grad(set_to_none=True)
    if face == "Function":
        torchext.TwoLayerSquare.apply(z, net.W, net.V, net.B, net.A).sum().backward()
    elif face == "create_graph":
        (gW,) = torch.autograd.grad(net(z).sum(), net.W, create_graph=True)
        gW.square().sum().backward()
    else:
        net(z).sum().backward()


CALLS = 3000
# Each allocation leaked costs malloc a chunk of at least 32 bytes: one a call
# would add 96 KB over the run. Runs without a leak have grown by 0 to 700 bytes.
SLACK_BYTES = 8 * 1024


@pytest.mark.parametrize("face,saved", [
    ("eager", True), ("eager", False), ("Function", True), ("Function", False), ("create_graph", False),
    ("create_graph", True), ("inference", False)])
def test_long_run_keeps_memory_flat(face, saved):
    d = 48 if saved else 16  # d + k >= 64: r and q are kept for the backward
    malloc_bytes_in_use()  # (skips before the warm-up where it cannot measure)
    net = torchext.TwoLayerSquareNet(d, 16, 16, 16)
    z = torch.randn(32, d)
    for _ in range(300):  # caches, thread buffers and allocator pools fill up
        steps(face, net, z)
    tensors, before = live_tensors(), malloc_bytes_in_use()
    for _ in range(CALLS):
        steps(face, net, z)
    gc.collect()  # as before the first reading (live_tensors)
    grown = malloc_bytes_in_use() - before
    assert grown < SLACK_BYTES, f"{grown} bytes more in use after {CALLS} calls"
    assert live_tensors() <= tensors  # (fewer is fine: a cache of torch's let go)
