"""CUDA-only checks (skipped without a GPU; scripts/gpu_check.sh runs them)."""
import pytest
import torch

import torchext
from conftest import SHAPES, assert_matches, make_inputs, requires_cuda

pytestmark = requires_cuda


def test_compile_reduce_overhead_matches_eager():
    torch._dynamo.reset()
    net = torchext.TwoLayerSquareNet(16, 32, 24, 8, device="cuda")
    z = torch.randn(300, 16, device="cuda")
    eager_f = net(z)
    compiled = torch.compile(net, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up runs, then CUDA-graph replays
        f = compiled(z)
    assert torch.allclose(f, eager_f, rtol=1e-5, atol=1e-6)
    f.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cuda(dtype):
    z, W, V, B, A = make_inputs(SHAPES["wide"], torch.float32, "cuda", seed=3)
    z = z.to(dtype).requires_grad_()
    W.requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        f = torchext.two_layer_square(z, W, V, B, A)
    assert f.dtype == torch.float32
    f.sum().backward()
    assert z.grad.dtype == dtype and W.grad.dtype == torch.float32
    ref = torchext.reference.two_layer_square(z.double(), W.double(), V.double(), B.double(), A.double())
    assert ((f.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_every_plan_on_cuda_matches_cpu():
    inputs = make_inputs(((777,), 24, 40, 12, 9), torch.float64, seed=1)
    for plan in ("direct", "folded", "quadratic"):
        cpu = torchext.two_layer_square(*inputs, plan=plan)
        gpu = torchext.two_layer_square(*[t.cuda() for t in inputs], plan=plan)
        assert_matches(gpu, cpu, torch.float64, plan)


def test_other_device_index_and_current_stream():
    device = f"cuda:{torch.cuda.device_count() - 1}"
    inputs = make_inputs(SHAPES["primes"], torch.float32, device, seed=2)
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.stream(stream):
        f = torchext.two_layer_square(*inputs)
    stream.synchronize()
    assert f.device == torch.device(device)
    assert_matches(f, torchext.two_layer_square(*[t.cpu() for t in inputs]), torch.float32)


def test_long_run_keeps_cuda_memory_flat():
    net = torchext.TwoLayerSquareNet(16, 16, 16, 16, device="cuda")
    z = torch.randn(64, 16, device="cuda")
    for _ in range(200):
        net(z).sum().backward()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(20000):
        net.zero_grad(set_to_none=False)
        net(z).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= 1 << 20
