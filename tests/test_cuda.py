"""CUDA-only checks (skipped without a GPU; scripts/gpu_check.sh runs them)."""
import pytest
import torch

import torchext
from cases import cases, module_leaves
from conftest import SHAPES, assert_matches, make_inputs, poisoned_buffers, reference_outputs, requires_cuda
from test_correctness import check_against_reference
from torchext.testing import load_testing_ops

TESTING = load_testing_ops()  # torch.ops.torchext_testing

pytestmark = requires_cuda
NAMES = ("z", "W", "V", "B", "A")


@pytest.mark.parametrize("case", cases(shapes=("odd-widths", "saved"), dtypes=(torch.float32,)))
def test_compile_reduce_overhead_matches_float64(case):
    # Warm-up runs, then CUDA-graph replays of the forward and the backward
    # (r and q saved across them where d + k >= 64): each step's f and
    # gradients against the float64 reference.
    torch._dynamo.reset()
    net, leaves = module_leaves(case, "cuda")
    f_ref, g, grads_ref = reference_outputs(leaves, grad_seed=case.seed)
    g = g.to(case.dtype).cuda()
    compiled = torch.compile(net, mode="reduce-overhead", fullgraph=True)
    for step in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        f = compiled(leaves[0])
        grads = torch.autograd.grad(f, leaves, g)
        assert_matches(f, f_ref, case.dtype, f"step {step} f")
        for name, got, want in zip(NAMES, grads, grads_ref):
            assert_matches(got, want, case.dtype, f"step {step} d{name}")


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


@pytest.mark.parametrize("plan", ["direct", "folded", "quadratic"])
@pytest.mark.parametrize("shape", ["wide", "primes"])
def test_backward_inside_autocast_cuda(shape, plan):
    # backward() inside the autocast block: the backward's own products stay
    # in float32 (they raised on mixed dtypes, or lost precision, when
    # autocast reached them), so the gradients equal those of a backward()
    # run outside it.
    inputs = make_inputs(SHAPES[shape], torch.float32, "cuda", seed=4)
    grads = []
    for inside in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            f = torchext.two_layer_square(*leaves, plan=plan)
            if inside:
                grads.append(torch.autograd.grad(f.sum(), leaves))
        if not inside:
            grads.append(torch.autograd.grad(f.sum(), leaves))
    for name, got, want in zip("zWVBA", grads[1], grads[0]):
        assert got.dtype == torch.float32 and torch.equal(got, want), name


@pytest.mark.parametrize("case", cases(shapes=("saved", "chunk-and-tail"), dtypes=(torch.float32, torch.float64)))
def test_every_plan_on_cuda_matches_float64(case):
    # f and every gradient on the GPU against the float64 reference on the CPU.
    check_against_reference(case.inputs("cuda"), case.dtype, plan=case.plan)


@pytest.mark.parametrize("case", cases(shapes=("primes",), dtypes=(torch.float32,)))
def test_other_device_index_and_current_stream(case):
    # The last GPU (not the current device, where there are several) and a
    # side stream: forward and backward run on that stream, their outputs on
    # that device.
    device = f"cuda:{torch.cuda.device_count() - 1}"
    inputs = case.inputs(device)
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.stream(stream):
        check_against_reference(inputs, case.dtype, plan=case.plan)
    stream.synchronize()


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


# The fused quadratic-plan kernels (two_layer_square_cuda.cu): shapes around
# the 64-wide tiles and 16-deep steps, 1 and primes, against the float64
# reference; with the kernels' buffers poisoned, so an element no kernel wrote
# shows as NaN.
FUSED_SHAPES = [
    ((1,), 1, 1, 1, 1),
    ((63,), 65, 64, 5, 3),
    ((64,), 64, 64, 64, 64),
    ((130,), 7, 129, 11, 13),
    ((1031,), 17, 31, 40, 2),
    ((2, 300), 96, 70, 9, 100),
    ((4096,), 64, 64, 64, 64),
    ((600,), 256, 256, 32, 16),
]


def _fused_case(shape, dtype, grad_kind, wants=(True,) * 5, seed=0):
    inputs = make_inputs(shape, dtype, "cuda", seed=seed)
    leaves = [t.detach().clone().requires_grad_(w) for t, w in zip(inputs, wants)]
    with poisoned_buffers():
        f = torchext.two_layer_square(*leaves, plan="quadratic")
        if grad_kind == "sum":  # the stride-0 gradient of .sum()
            g = torch.ones(f.shape, dtype=torch.float64)
            f.sum().backward()
        else:
            g = torch.randn(f.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
            f.backward(g.to(dtype).cuda())
    ref_leaves = [t.detach().double().cpu().requires_grad_(w) for t, w in zip(inputs, wants)]
    f_ref = torchext.reference.two_layer_square(*ref_leaves)
    (f_ref * g).sum().backward()
    return f, leaves, f_ref, ref_leaves


@pytest.mark.parametrize("grad_kind", ["random", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=[str(s) for s in FUSED_SHAPES])
def test_fused_quadratic_kernels_match_float64(shape, dtype, grad_kind):
    f, leaves, f_ref, ref_leaves = _fused_case(shape, dtype, grad_kind)
    assert_matches(f, f_ref, dtype, "f")
    for name, got, ref in zip(("z", "W", "V", "B", "A"), leaves, ref_leaves):
        assert torch.isfinite(got.grad).all(), f"d{name} has unwritten (NaN) elements"
        assert_matches(got.grad, ref.grad, dtype, "d" + name)


def test_fused_quadratic_every_subset_requiring_grad():
    import itertools

    for wants in itertools.product([False, True], repeat=5):
        if not any(wants):
            continue
        f, leaves, f_ref, ref_leaves = _fused_case(((700,), 40, 30, 10, 6), torch.float64, "random", wants, seed=4)
        for name, got, ref, w in zip(("z", "W", "V", "B", "A"), leaves, ref_leaves, wants):
            assert (got.grad is None) == (not w)
            if w:
                assert_matches(got.grad, ref.grad, torch.float64, f"{wants} d{name}")


def test_fused_quadratic_is_bitwise_reproducible_and_agrees_with_aten_path(monkeypatch):
    inputs = make_inputs(((5000,), 48, 80, 30, 20), torch.float32, "cuda", seed=7)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        f = torchext.two_layer_square(*leaves, plan="quadratic")
        f.sum().backward()
        return [f.detach()] + [t.grad for t in leaves]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # The switch is read once; the test hook reads it again.
    monkeypatch.setenv("TORCHEXT_CUDA_KERNELS", "aten")
    TESTING._cuda_reread_switches()
    try:
        aten = run()
    finally:
        monkeypatch.delenv("TORCHEXT_CUDA_KERNELS")
        TESTING._cuda_reread_switches()
    for a, b in zip(first, aten):
        assert_matches(a, b.double(), torch.float32)


def _quadratic_forward_matches_float64(shape, dtype, seed):
    inputs = make_inputs(shape, dtype, "cuda", seed=seed)
    with torch.no_grad():
        f = torchext.two_layer_square(*inputs, plan="quadratic")
    torch.cuda.synchronize()
    ref = torchext.reference.two_layer_square(*[t.double().cpu() for t in inputs])
    assert_matches(f.cpu(), ref, dtype, f"{shape}")


def test_quadratic_forward_widths_down_then_up_keep_launching():
    # A width past 48 KiB of shared memory raised the kernel's limit, a
    # narrower one lowered it, and the wider one then failed to launch.
    for k in (512, 256, 512, 768, 256):
        _quadratic_forward_matches_float64(((256,), 64, k, 16, 8), torch.float32, seed=k)


@pytest.mark.parametrize("dtype,k", [(torch.float32, 160), (torch.float64, 64), (torch.bfloat16, 128)])
def test_quadratic_forward_where_static_plus_dynamic_shared_memory_passes_48k(dtype, k):
    # The dynamic part alone is under 48 KiB here, static plus dynamic is not.
    _quadratic_forward_matches_float64(((300,), 32, k, 16, 8), dtype, seed=1)


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
        reason="tensor cores for bfloat16 need sm_80 or newer")),
    torch.float16,
])
def test_bfloat16_forward_runs_the_tensor_core_kernel_and_float16_the_simt_one(dtype):
    from torch.profiler import ProfilerActivity, profile

    inputs = make_inputs(((512,), 64, 128, 32, 16), dtype, "cuda", seed=2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.no_grad():
            torchext.two_layer_square(*inputs, plan="quadratic")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    tensor_cores = ("true", "Lb1E") if dtype == torch.bfloat16 else ("false", "Lb0E")
    assert any("quadratic_forward_kernel" in n and any(t in n for t in tensor_cores) for n in names), names


def test_direct_inference_forward_scratch_is_one_wave():
    # Wide layers (k + m past shared memory) take global scratch: sized for
    # the resident warps, not for every sample.
    inputs = make_inputs(((65536,), 16, 4000, 8, 4), torch.float32, "cuda", seed=3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        f = torchext.two_layer_square(*inputs, plan="direct")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 200 * 2**20
    head = [inputs[0][:64]] + list(inputs[1:])
    ref = torchext.reference.two_layer_square(*[t.double().cpu() for t in head])
    assert_matches(f[:64].cpu(), ref, torch.float32)


def test_fused_quadratic_under_cuda_graph_capture():
    z, W, V, B, A = make_inputs(((3000,), 64, 64, 64, 64), torch.float32, "cuda", seed=8)
    ops = torch.ops.torchext
    eager = ops._two_layer_square_forward(z, W, V, B, A, "quadratic", True)
    grads_eager = ops._two_layer_square_backward(torch.ones(3000, device="cuda"), z, W, V, B, A, *eager[1:],
                                                 [True] * 5)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture wants
        ops._two_layer_square_forward(z, W, V, B, A, "quadratic", True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    g = torch.ones(3000, device="cuda")
    with torch.cuda.graph(graph):
        out = ops._two_layer_square_forward(z, W, V, B, A, "quadratic", True)
        grads = ops._two_layer_square_backward(g, z, W, V, B, A, *out[1:], [True] * 5)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(list(out) + list(grads), list(eager) + list(grads_eager)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [((1000,), 64, 64, 64, 64), ((333,), 100, 129, 20, 7)])
def test_half_inputs_on_the_fused_kernels_within_1e2_of_float64(shape, dtype):
    # bfloat16 inputs run the tensor-core tiles (sm_80+), float16 ones the
    # float32 SIMT kernels: error of f and of every gradient against float64
    # on the same (rounded) inputs < 1e-2.
    inputs = [t.to(dtype) for t in make_inputs(shape, torch.float32, "cuda", seed=11)]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    f = torchext.two_layer_square(*leaves, plan="quadratic")
    g = torch.randn(f.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    f.backward(g.to(f.dtype).cuda())
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    f_ref = torchext.reference.two_layer_square(*ref_leaves)
    (f_ref * g).sum().backward()
    from conftest import rel_err
    assert rel_err(f, f_ref) < 1e-2
    for name, got, ref in zip(("z", "W", "V", "B", "A"), leaves, ref_leaves):
        assert got.grad.dtype == dtype
        assert rel_err(got.grad, ref.grad) < 1e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [((), 16, 16, 16, 16), ((5,), 3, 300, 7, 2), ((64,), 33, 40, 50, 9)])
def test_small_batch_direct_backward_kernel(shape, dtype):
    # the direct plan's one-block backward (direct_kernels.cuh), every subset of
    # gradients, against float64 (its buffers poisoned)
    import itertools

    for wants in itertools.product([False, True], repeat=5):
        if not any(wants):
            continue
        inputs = make_inputs(shape, dtype, "cuda", seed=12)
        leaves = [t.detach().clone().requires_grad_(w) for t, w in zip(inputs, wants)]
        with poisoned_buffers():
            f = torchext.two_layer_square(*leaves, plan="direct")
            f.sum().backward()
        ref_leaves = [t.detach().double().cpu().requires_grad_(w) for t, w in zip(inputs, wants)]
        torchext.reference.two_layer_square(*ref_leaves).sum().backward()
        for name, got, ref, w in zip(("z", "W", "V", "B", "A"), leaves, ref_leaves, wants):
            if w:
                assert_matches(got.grad, ref.grad, dtype, f"{wants} d{name}")


def test_kernel_switch_is_read_once(monkeypatch):
    # TORCHEXT_CUDA_KERNELS is read once (no getenv per call, no race with a
    # setenv): setting it later changes nothing until the switches are re-read.
    inputs = make_inputs(((3000,), 48, 80, 30, 20), torch.float32, "cuda", seed=12)
    fused = torchext.two_layer_square(*inputs, plan="quadratic")
    monkeypatch.setenv("TORCHEXT_CUDA_KERNELS", "aten")
    assert torch.equal(torchext.two_layer_square(*inputs, plan="quadratic"), fused)
    TESTING._cuda_reread_switches()
    try:
        aten = torchext.two_layer_square(*inputs, plan="quadratic")
    finally:
        monkeypatch.delenv("TORCHEXT_CUDA_KERNELS")
        TESTING._cuda_reread_switches()
    assert not torch.equal(aten, fused)  # another association: not bitwise the fused kernel's
    assert_matches(aten, fused.double(), torch.float32)
