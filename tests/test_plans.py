"""The algebraic plan: every path against the float64 reference, the cost
model's choices, the accuracy bound, cancellation, NaN, and saved memory."""
import pytest
import torch

import torchext
from conftest import (
    DEVICES, SHAPES, assert_matches, eager_outputs, fused_outputs, make_inputs, poisoned_buffers,
    reference_outputs, rel_err,
)
from torchext.testing import cancelling_inputs, load_testing_ops, saved_tensors

TESTING = load_testing_ops()  # torch.ops.torchext_testing

OPS = torch.ops.torchext
PLANS = ["direct", "folded", "quadratic"]
NAMES = ("z", "W", "V", "B", "A")
# Shape families for the plans, including ell < k and ell > k.
PLAN_SHAPES = {
    "ell<k": ((37,), 9, 24, 11, 5),
    "ell>k": ((29,), 7, 5, 13, 31),
    "square": ((64,), 16, 16, 16, 16),
    "primes": SHAPES["primes"],
    "vector": SHAPES["vector"],
    "two-leading": SHAPES["two-leading"],
    "empty-batch": SHAPES["empty-batch"],
    "many-chunks": ((1500,), 8, 12, 10, 6),
    "many-chunks-kept": ((700,), 40, 30, 10, 6),  # d + k >= 64: r and q are saved
    # direct: a chunk's buffers exceed what a thread keeps across calls (8 MiB);
    # 9 chunks of 256 rows (a batch of fewer would be split into smaller ones)
    "oversized-scratch": ((2100,), 4, 4, 8200, 4),
    # wide V and B, read transposed by many column panels; the direct
    # chain's buffers under and over the 8 MiB a thread keeps across calls
    "wide-head": ((40,), 8, 8, 600, 800),
    "wide-head-large": ((40,), 8, 8, 1100, 2100),
    # rows of k = 64 are a multiple of 256 bytes (float32 and float64): p and
    # g ⊙ r get a padded row stride (spread_stride in chunk_kernels.h)
    "padded-rows": ((300,), 40, 64, 12, 9),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("shape", list(PLAN_SHAPES), ids=list(PLAN_SHAPES))
def test_each_plan_float64(shape, plan, device):
    inputs = make_inputs(PLAN_SHAPES[shape], torch.float64, device, seed=list(PLAN_SHAPES).index(shape))
    f_ref, g, grads_ref = reference_outputs(inputs)
    f, grads = fused_outputs(inputs, g, plan=plan)
    assert_matches(f, f_ref, torch.float64, "f")
    for name, gr, ref in zip(NAMES, grads, grads_ref):
        assert_matches(gr, ref, torch.float64, "d" + name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("shape", ["ell<k", "ell>k", "square", "many-chunks", "many-chunks-kept"])
def test_each_plan_float32_within_10x_of_eager(shape, plan, device):
    # error = ‖out − out₆₄‖ / ‖out₆₄‖ for f and each gradient, on fresh random inputs
    for seed in range(2):
        inputs = make_inputs(PLAN_SHAPES[shape], torch.float32, device, seed=100 + seed)
        f_ref, g, grads_ref = reference_outputs(inputs)
        f, grads = fused_outputs(inputs, g, plan=plan)
        f_e, grads_e = eager_outputs(inputs, g)
        for name, got, eag, ref in zip(("f",) + NAMES, [f] + grads, [f_e] + grads_e, [f_ref] + grads_ref):
            bound = 10 * max(rel_err(eag, ref), 1e-7)
            assert rel_err(got, ref) <= bound, f"{plan} {name}: {rel_err(got, ref):.2e} > {bound:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", ["auto", *PLANS])
@pytest.mark.parametrize("shape", ["primes", "ell>k", "many-chunks-kept"])
def test_every_subset_requiring_grad(shape, plan, device):
    # Each of the 32 subsets of inputs requiring grad: the gradients asked
    # for, right, in each input's dtype, shape and device; the backward op
    # returns None for the rest. many-chunks-kept: saved r and q (for direct:
    # the saved y, with u = V r recomputed only when B wants its gradient).
    import itertools

    inputs = make_inputs(PLAN_SHAPES[shape], torch.float64, device, seed=5)
    state = OPS._two_layer_square_forward(*inputs, plan, True)[1:]
    for wants in itertools.product([False, True], repeat=5):
        f_ref, g, grads_ref = reference_outputs(inputs, wants=wants)
        f, grads = fused_outputs(inputs, g, wants, plan)
        assert_matches(f, f_ref, torch.float64, f"{plan} {wants} f")
        from_op = OPS._two_layer_square_backward(g.to(device), *inputs, *state, list(wants))
        for name, t, gr, op_gr, ref, want in zip(NAMES, inputs, grads, from_op, grads_ref, wants):
            assert (op_gr is None) == (not want), f"{plan} {wants} d{name} from the op"
            if want:
                assert (gr.dtype, gr.shape, gr.device) == (t.dtype, t.shape, t.device), name
                assert_matches(gr, ref, torch.float64, f"{plan} {wants} d{name}")
                assert_matches(op_gr, ref, torch.float64, f"{plan} {wants} d{name} from the op")


def test_plans_really_differ():
    # Forcing a plan changes the association order: the float32 results are
    # close but not bitwise equal, so each test above exercises its own path.
    inputs = make_inputs(((200,), 32, 24, 20, 28), torch.float32, seed=3)
    outs = [torchext.two_layer_square(*inputs, plan=p) for p in PLANS]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2]) and not torch.equal(outs[0], outs[2])


def test_cost_model_choices():
    plan = TESTING._plan
    assert plan(1, 16, 16, 16, 16) == "direct"              # z a vector: no per-call products
    assert plan(8192, 64, 64, 1024, 1024) == "quadratic"    # wide m, ell: per-sample cost k·d + k²
    assert plan(4096, 128, 128, 128, 128) == "quadratic"
    assert plan(4096, 128, 256, 128, 8) == "folded"         # ell ≪ k: M r is cheaper than Q r
    for shape in [(1, 3, 5, 7, 11), (10**5, 512, 3, 512, 512)]:
        assert plan(*shape, plan="direct") == "direct"
    with pytest.raises(ValueError, match='plan must be "auto", "direct", "folded" or "quadratic"; got "fast"'):
        plan(3, 3, 3, 3, 3, plan="fast")


def test_bad_plan_name():
    inputs = make_inputs(SHAPES["small"], torch.float32)
    with pytest.raises(ValueError, match=r"plan must be one of \('auto', 'direct', 'folded', 'quadratic'\); got 'fast'"):
        torchext.two_layer_square(*inputs, plan="fast")
    with pytest.raises(ValueError, match='plan must be "auto"'):
        OPS._two_layer_square_forward(*inputs, "fast", False)
    with pytest.raises(ValueError, match="plan must be one of"):
        torchext.TwoLayerSquareNet(3, 3, 3, 3, plan="fast")


def cancellation_errors():
    """Relative errors (f and each gradient) of each plan and of eager float32."""
    inputs = cancelling_inputs()  # torchext.testing
    f_ref, g, grads_ref = reference_outputs(inputs)
    errors = {}
    f_e, grads_e = eager_outputs(inputs, g)
    errors["eager"] = [rel_err(o, r) for o, r in zip([f_e] + grads_e, [f_ref] + grads_ref)]
    for plan in PLANS:
        f, grads = fused_outputs(inputs, g, plan=plan)
        errors[plan] = [rel_err(o, r) for o, r in zip([f] + grads, [f_ref] + grads_ref)]
    return errors


def test_cancellation_direct_plan_stays_within_bound():
    errors = cancellation_errors()
    for i, name in enumerate(("f",) + NAMES):
        bound = 10 * max(errors["eager"][i], 1e-7)
        assert errors["direct"][i] <= bound, (name, errors["direct"][i], bound)
    # ...while the quadratic form really does lose accuracy there (documented).
    assert errors["quadratic"][0] > 20 * errors["eager"][0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("index", range(5), ids=NAMES)
def test_nan_on_every_plan(index, plan, device):
    inputs = list(make_inputs(PLAN_SHAPES["primes"], torch.float64, device, seed=index))
    t = inputs[index].clone()
    t.view(-1)[t.numel() // 2] = float("nan")
    inputs[index] = t
    f, grads = fused_outputs(inputs, torch.ones(13, dtype=torch.float64), plan=plan)
    f_ref, _, grads_ref = reference_outputs([x.cpu() for x in inputs])
    # Each output is NaN exactly where eager's is, on every plan.
    for name, got, ref in zip(("f",) + NAMES, [f] + grads, [f_ref] + grads_ref):
        assert torch.equal(torch.isnan(got.cpu()), torch.isnan(ref)), name


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("d,k,kept", [(40, 30, True), (9, 7, False)])
def test_saved_for_backward_is_inputs_plus_two_n_by_k(plan, d, k, kept):
    # Wide enough (d + k >= 64): r and q are kept; narrower: recomputed in the backward.
    N, m, ell = 300, 40, 50
    inputs = [t.requires_grad_() for t in make_inputs(((N,), d, k, m, ell), torch.float32, seed=1)]
    f, saved = saved_tensors(lambda: torchext.two_layer_square(*inputs, plan=plan))
    input_ptrs = {t.data_ptr() for t in inputs}
    extra = [t for t in saved if t.data_ptr() not in input_ptrs and t.numel()]
    assert sum(t.numel() for t in extra) <= 2 * N * k
    assert len(extra) == (2 if kept else 0) and all(t.shape == (N, k) for t in extra)
    f.sum().backward()
    grads = [t.grad for t in inputs]
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    torchext.reference.two_layer_square(*leaves).sum().backward()
    for got, want in zip(grads, leaves):
        assert rel_err(got, want.grad) < 1e-4


@pytest.mark.parametrize("plan", PLANS)
def test_generic_aten_path_matches(plan):
    # The device-generic ATen implementation (what the CUDA backend runs) on CPU,
    # with chunks of 64 rows, against the float64 reference.
    for shape in ["many-chunks", "many-chunks-kept", "ell<k", "ell>k", "vector"]:
        inputs = make_inputs(PLAN_SHAPES[shape], torch.float64, seed=7)
        f_ref, g, grads_ref = reference_outputs(inputs)
        f, *saved = TESTING._two_layer_square_forward_aten(*inputs, plan, True)
        assert_matches(f, f_ref, torch.float64, "f")
        f_nosave, *recompute = TESTING._two_layer_square_forward_aten(*inputs, plan, False)
        assert recompute[0].shape[0] == 0 and torch.allclose(f_nosave, f)
        for state in (saved, recompute):  # from saved r, q (where kept) / recomputed
            grads = TESTING._two_layer_square_backward_aten(g.reshape(f.shape), *inputs, *state, [True] * 5)
            for name, gr, ref in zip(NAMES, grads, grads_ref):
                assert_matches(gr, ref, torch.float64, f"{shape} d{name}")


@pytest.mark.parametrize("plan", PLANS)
def test_aten_path_ignores_an_enclosing_autocast(plan):
    # backward() inside an autocast block runs the backward op with autocast
    # on: the ATen products inside (what the CUDA backend runs) must not be
    # cast down, which made the recomputing backward raise on mixed dtypes
    # and the others lose precision. Results equal those outside autocast.
    for shape in ["many-chunks", "many-chunks-kept"]:
        inputs = make_inputs(PLAN_SHAPES[shape], torch.float32, seed=8)
        g = torch.randn(PLAN_SHAPES[shape][0])
        want_f, *state = TESTING._two_layer_square_forward_aten(*inputs, plan, True)
        want = TESTING._two_layer_square_backward_aten(g, *inputs, *state, [True] * 5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f, *state = TESTING._two_layer_square_forward_aten(*inputs, plan, True)
            grads = TESTING._two_layer_square_backward_aten(g, *inputs, *state, [True] * 5)
        assert torch.equal(f, want_f), shape
        for name, got, ref in zip(NAMES, grads, want):
            assert got.dtype == torch.float32 and torch.equal(got, ref), f"{shape} d{name}"
        # and the CPU kernels, through the public function
        grads = []
        for inside in (False, True):
            leaves = [t.clone().requires_grad_() for t in inputs]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = (torchext.two_layer_square(*leaves, plan=plan) * g).sum()
                if inside:
                    grads.append(torch.autograd.grad(loss, leaves))
            if not inside:
                grads.append(torch.autograd.grad(loss, leaves))
        for name, got, ref in zip(NAMES, *grads):
            assert got.dtype == torch.float32 and torch.equal(got, ref), f"{shape} public d{name}"


def test_module_plan_argument():
    net = torchext.TwoLayerSquareNet(6, 5, 4, 3, plan="quadratic", dtype=torch.float64)
    assert "plan='quadratic'" in repr(net)
    z = torch.randn(11, 6, dtype=torch.float64)
    assert_matches(net(z), torchext.reference.two_layer_square(z, net.W, net.V, net.B, net.A), torch.float64)


# The kernels' outputs, gradient buffers, partials and scratch come
# uninitialised (a partition's first chunk writes what later chunks add to):
# poisoned, a slot that were only ever added to, or never written, shows as NaN.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("shape", ["ell>k", "many-chunks", "many-chunks-kept", "ell<k", "padded-rows"])
def test_buffers_never_show_stale_memory(shape, plan, dtype):
    import itertools

    inputs = make_inputs(PLAN_SHAPES[shape], dtype, seed=9)
    z, W, V, B, A = inputs
    for save in (True, False):
        with poisoned_buffers():
            f, *state = OPS._two_layer_square_forward(z, W, V, B, A, plan, save)
        for wants in itertools.product([False, True], repeat=5):
            if not any(wants):
                continue
            f_ref, g, grads_ref = reference_outputs(inputs, wants=wants)
            assert_matches(f, f_ref, dtype, f"{plan} save={save} f")
            with poisoned_buffers():
                grads = OPS._two_layer_square_backward(g.to(dtype), z, W, V, B, A, *state, list(wants))
            for name, gr, ref in zip(NAMES, grads, grads_ref):
                assert (gr is None) == (ref is None), name
                if ref is not None:
                    assert_matches(gr, ref, dtype, f"{plan} save={save} {wants} d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("shape", ["square", "many-chunks", "many-chunks-kept", "two-leading"])
def test_broadcast_incoming_gradient_equals_materialised(shape, plan, device):
    # f.sum() and f.mean() hand the backward a stride-0 gradient, which the
    # kernels read in place: bitwise the result of the materialised one.
    z, W, V, B, A = make_inputs(PLAN_SHAPES[shape], torch.float32, device, seed=3)
    f, *state = OPS._two_layer_square_forward(z, W, V, B, A, plan, True)
    broadcast = torch.tensor(0.37, device=device).expand(f.shape)
    assert broadcast.numel() <= 1 or 0 in broadcast.stride()
    mask = [True] * 5
    got = OPS._two_layer_square_backward(broadcast, z, W, V, B, A, *state, mask)
    want = OPS._two_layer_square_backward(broadcast.contiguous(), z, W, V, B, A, *state, mask)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), f"{plan} d{name}"


def test_backward_partials_count_the_gram():
    # Each partition of the quadratic backward holds a k×k Gram: at k = 4096
    # (64 MiB in float32) the partial-buffer budget allows one partition, not
    # eight. Measured as the peak resident memory the backward adds, in a
    # fresh process.
    import subprocess
    import sys

    code = """
import resource, torch, torchext
torch.manual_seed(0)
N, d, k, m, ell = 2048, 2, 4096, 2, 2
z = torch.randn(N, d)
W, V, B, A = [torch.randn(*s).requires_grad_() for s in ((k, d), (m, k), (ell, m), (1, ell))]
f = torchext.two_layer_square(z, W, V, B, A, plan="quadratic")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
f.sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    added_mib = float(out.stdout.split()[-1])
    gram_mib = 4096 * 4096 * 4 / 2**20
    assert added_mib < 3 * gram_mib, f"the backward added {added_mib:.0f} MiB of resident memory"


def test_public_forward_runs_the_plan_its_backward_runs():
    # At these sizes "auto" picks quadratic for a forward alone and direct for
    # training. The public forward (TwoLayerSquare, the raw op) has no state to
    # pass on, and its backward resolves by the training cost, so the forward
    # must too: f is then bitwise the direct plan's.
    N, d, k, m, ell = 256, 8, 16, 32, 64
    assert TESTING._plan(N, d, k, m, ell, "auto", False) == "quadratic"
    assert TESTING._plan(N, d, k, m, ell, "auto", True) == "direct"
    inputs = make_inputs(((N,), d, k, m, ell), torch.float32, seed=11)
    direct = OPS._two_layer_square_forward(*inputs, "direct", False)[0]
    assert torch.equal(OPS.two_layer_square(*inputs), direct)
    assert torch.equal(torchext.TwoLayerSquare.apply(*inputs), direct)


# The CPU split (chunk rows, chunks, partitions) of a call: small batches with
# enough work per sample are cut finer, by the shapes alone.
@pytest.mark.parametrize("sizes, plan, training, split", [
    ((300, 48, 64, 40, 24), "direct", False, [64, 5, 5]),  # cases.py "split-saved"
    ((300, 48, 64, 40, 24), "direct", True, [64, 5, 5]),
    ((300, 48, 64, 40, 24), "quadratic", True, [128, 3, 3]),
    ((300, 24, 32, 96, 80), "direct", True, [32, 10, 5]),  # cases.py "split-recomputed"
    ((64, 64, 64, 64, 64), "direct", True, [32, 2, 2]),  # the benchmark's `small`
    ((40, 8, 8, 1100, 2100), "direct", False, [32, 2, 2]),  # never below 32 rows
    ((1, 16, 16, 16, 16), "direct", True, [512, 1, 1]),  # one sample: one chunk
    ((4096, 128, 128, 128, 128), "quadratic", True, [256, 16, 8]),  # many chunks: unchanged
    ((2100, 4, 4, 8200, 4), "direct", True, [256, 9, 5]),  # "oversized-scratch"
    ((300, 4096, 4096, 4, 4), "direct", True, [256, 2, 1]),  # partials over budget: no split
    ((300, 4096, 4096, 4, 4), "direct", False, [32, 10, 1]),  # (a forward has no partials)
])
def test_cpu_split(sizes, plan, training, split):
    assert TESTING._cpu_split(*sizes, plan, training) == split
