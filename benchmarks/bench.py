"""Benchmark: torchext vs eager PyTorch vs torch.compile vs two no-op floors.

    python benchmarks/bench.py [--device cpu|cuda] [--quick] [--cases a,b] [--no-compile]
                               [--cpu-kernels auto|avx512|avx2|neon|generic]

Times forward+backward (W and V trainable, loss = f.sum()) and forward-only
(under torch.no_grad()) side by side in one run: contenders are interleaved
round by round, each timed with torch.utils.benchmark on the CPU, or with CUDA
events on the GPU (warm-up, then one event pair per call, cycling through
enough input sets that they do not all sit in L2), medians, and the best
median over the rounds is kept. The two floors make no products: a Python
autograd.Function (#3's floor), and a C++ autograd node called and saving as
the plain-eager route's node does, with nothing inside (no Python wrapper, no
op calls, checks or kernels of the route's own). On the GPU the run also
measures the card's float32 multiply-add and copy ceilings, counts each
case's FLOPs and bytes, reports the fraction of the resulting time floor
reached, and times bfloat16 inputs at gpu-large. On the CPU it measures the
register-only FMA rate of the running kernel set and reports each case's
fraction of it; where a case misses its target against eager, it also times
the forward and backward ops alone (at N and at one sample, on one thread
and on all) and reports the fraction of that rate the per-sample work runs
at, and the fraction the target would need with every other cost as
measured (product_budget).
--cpu-kernels forces torchext's CPU kernel set (TORCHEXT_CPU_KERNELS); a
narrower x86 set than the CPU has also holds eager and torch.compile to it
(EMULATED_ISA below), so that every contender runs as on a CPU without the
wider vectors. Prints a table, writes JSON and a PNG plot to
benchmarks/results/. A script, not a test: timings are noisy; compare ratios.
"""
import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys


# What a CPU with only these vectors would run, for every contender: torch's
# own kernels (ATen's capability), MKL's and oneDNN's code paths, and the
# vector width of the C++ that torch.compile generates. Set before torch loads.
EMULATED_ISA = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
INDUCTOR_SIMDLEN = {"avx2": 256}


def _cpu_kernels_arg(argv):
    for i, a in enumerate(argv):
        if a == "--cpu-kernels" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--cpu-kernels="):
            return a.split("=", 1)[1]
    return None


if __name__ == "__main__" and _cpu_kernels_arg(sys.argv[1:]):
    _kernels = _cpu_kernels_arg(sys.argv[1:])
    os.environ["TORCHEXT_CPU_KERNELS"] = _kernels  # read when torchext loads
    os.environ.update(EMULATED_ISA.get(_kernels, {}))

import torch
from torch.utils import benchmark

import torchext
from torchext import reference
from torchext.testing import load_testing_ops, saved_tensors

TESTING = load_testing_ops()  # torch.ops.torchext_testing

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (N or None for z a vector, d, k, m, ell)
CPU_CASES = {
    "seed-vector": (None, 16, 16, 16, 16),
    "small": (64, 64, 64, 64, 64),
    "medium": (4096, 128, 128, 128, 128),
    "large": (65536, 256, 256, 256, 256),
    "wide-mid": (8192, 64, 64, 1024, 1024),
    "narrow-tall": (262144, 16, 16, 16, 16),
}
GPU_CASES = {
    "gpu-seed-vector": (None, 16, 16, 16, 16),
    "gpu-small": (4096, 64, 64, 64, 64),
    "gpu-medium": (262144, 64, 64, 64, 64),
    "gpu-large": (1048576, 256, 256, 256, 256),
    "gpu-wide-mid": (65536, 64, 64, 1024, 1024),
}
# Targets from the issues: (vs eager, vs torch.compile), fwd+bwd.
TARGETS = {
    "seed-vector": (1.75, None), "small": (2.0, None), "medium": (2.5, 2.0),
    "large": (2.5, 1.8), "wide-mid": (20, 15), "narrow-tall": (4, 3),
    "gpu-seed-vector": (2, None), "gpu-small": (3, 1.5), "gpu-medium": (3, 2),
    "gpu-large": (1.5, 1.2), "gpu-wide-mid": (20, 15),
}


class NoOpFloor(torch.autograd.Function):
    """The floor: a Python autograd.Function that does no work — forward returns
    zeros shaped like f, backward zeros shaped like W and V."""

    @staticmethod
    def forward(z, W, V, B, A):
        return z.new_zeros(z.shape[:-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shapes = (inputs[1].shape, inputs[2].shape)

    @staticmethod
    def backward(ctx, grad):
        return None, grad.new_zeros(ctx.shapes[0]), grad.new_zeros(ctx.shapes[1]), None, None


def cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def cpu_flags():
    """The vector-ISA flags /proc/cpuinfo lists (x86: avx*, fma; ARM: asimd, sve)."""
    try:
        with open("/proc/cpuinfo") as fh:
            words = next((line.split(":", 1)[1].split() for line in fh if line.startswith(("flags", "Features"))), [])
    except OSError:
        return []
    return sorted(w for w in words if w.startswith(("avx", "fma", "asimd", "sve", "amx")))


def make_case(shape, device, dtype=torch.float32, seed=0):
    N, d, k, m, ell = shape
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*(() if N is None else (N,)), d, generator=g).to(device, dtype)
    W = (torch.randn(k, d, generator=g) * (2 / d) ** 0.5).to(device, dtype).requires_grad_()
    V = (torch.randn(m, k, generator=g) / k ** 0.5).to(device, dtype).requires_grad_()
    B = (torch.randn(ell, m, generator=g) / m ** 0.5).to(device, dtype)
    A = (torch.rand(1, ell, generator=g) * 2 / ell).to(device, dtype)
    return z, W, V, B, A


def keeps_saved(d, k):
    """Whether a training forward saves r and q for its backward (csrc/plan.h)."""
    return d + k >= 64


def plan_flops(shape, plan):
    """Floating-point operations (2 per multiply-add) of one fwd+bwd of the plan
    as the kernels run it: what the forward saves (csrc/plan.h: r and q where
    d + k >= 64, and for the direct plan y in q's slot where ell <= k) decides
    what the backward computes again. Counted by association, not by the
    kernels' tiles: where q is not saved, the narrow kernels' forward takes f
    from Q's upper triangle, about k²/2 fewer per sample (narrow-tall's count
    is about 6% high)."""
    N, d, k, m, ell = shape
    N = N or 1
    fold = ell * m * k
    saved = keeps_saved(d, k)
    if plan == "direct":
        # x, u = V r, y = B u; then Bᵀe, Vᵀ(.), dV, dW, with x (unsaved r) and
        # u, y (unsaved y) again
        per_sample = 2 * k * d + 3 * m * k + 2 * ell * m
        if not (saved and ell <= k):
            per_sample += m * k + ell * m
        if not saved:
            per_sample += k * d
        macs = N * per_sample
    elif plan == "folded":  # M = B V (again in the backward), then D = Ma G, dV = Bᵀ D
        macs = 3 * fold + ell * k * k + N * (2 * k * d + 2 * ell * k + 0.5 * k * k)
        if not saved:  # x and y again, q only in the backward
            macs += N * (k * d + ell * k)
    else:  # quadratic: M, Q; x, q = Q r; dW, the Gram's upper half; then D, dV
        macs = 3 * fold + 2 * ell * k * k + N * (2 * k * d + 1.5 * k * k)
        if not saved:  # M, Q, x and q again
            macs += ell * k * k + N * (k * d + k * k)
    return 2 * macs


def cuda_event_medians(fns, rounds, min_run_time, rotate=None):
    """Best (over rounds) median seconds per call, CUDA events around each call.
    rotate(i) is called before call i to switch input sets (cheap Python)."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():  # warm-up: kernels loaded, allocator primed
        for i in range(3):
            if rotate:
                rotate(i)
            fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in fns.items():
            times, spent, i = [], 0.0, 0
            while spent < min_run_time or len(times) < 10:
                if rotate:
                    rotate(i)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
                times.append(ms / 1e3)
                spent += ms / 1e3
                i += 1
                if len(times) >= 2000:
                    break
            times.sort()
            best[name] = min(best[name], times[len(times) // 2])
    return best


def timer_for(fn, device):
    # Every contender on torch's intra-op threads, as a user's code runs
    # (benchmark.Timer's own default is one thread).
    sync = "torch.cuda.synchronize()" if device == "cuda" else ""
    return benchmark.Timer(stmt=f"fn(); {sync}", globals={"fn": fn, "torch": torch},
                           num_threads=torch.get_num_threads())


def interleaved_medians(fns, device, rounds, min_run_time, rotate=None):
    """Best (over rounds) median seconds per call of each fn, contenders interleaved."""
    if device == "cuda":
        return cuda_event_medians(fns, rounds, min_run_time, rotate)
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            m = timer_for(fn, device).blocked_autorange(min_run_time=min_run_time)
            best[name] = min(best[name], m.median)
    return best


def matmul_rates_gflops(device, n=1024):
    """float32 n×n×n product rates: torch.mm and, on the CPU, the product kernel
    torchext's CPU kernels run on. The faster is the run's peak: on CPUs where
    BLAS runs below the hardware's rate (MKL on AMD), torch.mm alone would
    flatter every fraction of it."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    rates = {"torch.mm": 2 * n ** 3 / timer_for(lambda: a @ b, device).blocked_autorange(min_run_time=1.0).median / 1e9}
    if device == "cpu":
        mm = TESTING._cpu_matmul
        rates["torchext"] = 2 * n ** 3 / timer_for(lambda: mm(a, b), device).blocked_autorange(min_run_time=1.0).median / 1e9
    return rates


def gpu_ceilings(n=8192, copy_elems=1 << 28):
    """The card's float32 multiply-add rate (an n³ product with TF32 off) and
    copy bandwidth (bytes read plus written by a device-to-device copy of
    copy_elems floats, 1 GiB), measured now."""
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t_mm = cuda_event_medians({"mm": lambda: a @ b}, 1, 1.0)["mm"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    src = torch.empty(copy_elems, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    t_copy = cuda_event_medians({"copy": lambda: dst.copy_(src)}, 1, 1.0)["copy"]
    return {"fp32_tflops": 2 * n ** 3 / t_mm / 1e12, "copy_gbytes_per_s": 2 * src.nbytes / t_copy / 1e9}


def plan_bytes(shape, plan, itemsize=4):
    """Fewest bytes one fwd+bwd must move through device memory: the inputs read,
    f and the weight gradients written, and for plans that save r and q (two
    N×k tensors) those written once and read once."""
    N, d, k, m, ell = shape
    N = N or 1
    inputs = N * d + k * d + m * k + ell * m + ell
    outputs = N + k * d + m * k  # f, dW, dV
    saved = 2 * N * k * 2 if keeps_saved(d, k) else 0
    return itemsize * (inputs + outputs + saved)


def rotating_sets(shape, device, l2_bytes):
    """Enough independent input sets that cycling through them keeps the working
    set over four times the L2 (at most 64 sets)."""
    N, d, k, m, ell = shape
    per_set = 4 * ((N or 1) * d + k * d + m * k + ell * m + ell + 4 * (N or 1) * k)
    count = max(1, min(64, -(-4 * l2_bytes // per_set)))
    return [make_case(shape, device, seed=i) for i in range(count)]


def bf16_check(shape):
    """gpu-large in bfloat16 against float32 (fwd+bwd times), and the bfloat16
    result's error against float64 on the same (bf16-rounded) inputs."""
    z, W, V, B, A = make_case(shape, "cuda")
    zb, Wb, Vb, Bb, Ab = (t.detach().to(torch.bfloat16).requires_grad_(t.requires_grad) for t in (z, W, V, B, A))
    t = cuda_event_medians({
        "float32": lambda: torchext.two_layer_square(z, W, V, B, A).sum().backward(),
        "bfloat16": lambda: torchext.two_layer_square(zb, Wb, Vb, Bb, Ab).sum().backward(),
    }, 1, 1.0)
    rows = slice(0, 65536)  # the float64 reference on a slice of the batch
    f = torchext.two_layer_square(zb[rows], Wb, Vb, Bb, Ab).double()
    ref = reference.two_layer_square(*(x.detach().double() for x in (zb[rows], Wb, Vb, Bb, Ab)))
    err = ((f - ref).norm() / ref.norm()).item()
    return {"float32_ms": t["float32"] * 1e3, "bfloat16_ms": t["bfloat16"] * 1e3,
            "speedup": t["float32"] / t["bfloat16"], "bf16_rel_err_f_vs_float64": err}


def extra_saved_bytes(fn, inputs):
    """Bytes of tensors autograd saves for backward that are not the inputs."""
    _, seen = saved_tensors(fn)
    ptrs = {t.data_ptr() for t in inputs}
    uniq = {}
    for t in seen:
        if t.data_ptr() not in ptrs:
            uniq[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(uniq.values())


PEAK_RSS_CHILD = r"""
import sys, torch, torchext
from torchext import reference
sys.path.insert(0, {here!r})
from bench import make_case
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
torch.manual_seed(0)
fn = {{'torchext': torchext.two_layer_square, 'eager': reference.two_layer_square}}[{who!r}]
fn(*make_case((64,) + {shape!r}[1:], 'cpu')).sum().backward()  # load code, start threads
z, W, V, B, A = make_case({shape!r}, 'cpu')
open('/proc/self/clear_refs', 'w').write('5')   # reset the peak (VmHWM) to the current RSS
before = rss('VmRSS:')
fn(z, W, V, B, A).sum().backward()
print(rss('VmHWM:') - before)
"""


def peak_rss_added(shape, who):
    code = PEAK_RSS_CHILD.format(here=HERE, shape=shape, who=who)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return None
    return int(out.stdout.strip().splitlines()[-1])


def sweep_shapes(count, seed):
    rng = random.Random(seed)
    shapes = []
    for _ in range(count):
        N = int(10 ** rng.uniform(0, 5))
        d, k, m, ell = (int(2 ** rng.uniform(0, 9)) for _ in range(4))
        shapes.append((N, d, k, m, ell))
    return shapes


def run_case(name, shape, device, rounds, min_run_time, use_compile, compiled, l2_bytes=0):
    # On the GPU, calls cycle through several input sets (see rotating_sets).
    sets = rotating_sets(shape, device, l2_bytes) if device == "cuda" else [make_case(shape, device)]
    cur = list(sets[0])

    def rotate(i):
        cur[:] = sets[i % len(sets)]

    z, W, V, B, A = sets[0]
    N = shape[0] or 1
    plan = TESTING._plan(N, *shape[1:])
    fns = {
        "torchext": lambda: torchext.two_layer_square(*cur).sum().backward(),
        "eager": lambda: reference.two_layer_square(*cur).sum().backward(),
        "floor": lambda: NoOpFloor.apply(*cur).sum().backward(),
        "node floor": lambda: TESTING._noop_node(*cur).sum().backward(),
    }
    if use_compile:
        fns["compile"] = lambda: compiled(*cur).sum().backward()
        for _ in range(2):
            fns["compile"]()  # compile outside the timing
    for fn in fns.values():
        fn()
    t = interleaved_medians(fns, device, rounds, min_run_time, rotate if len(sets) > 1 else None)

    def no_grad(f):
        def run():
            with torch.no_grad():
                f(*cur)
        return run

    tf = interleaved_medians({"torchext": no_grad(torchext.two_layer_square), "eager": no_grad(reference.two_layer_square)},
                             device, rounds, min_run_time, rotate if len(sets) > 1 else None)
    flops = plan_flops(shape, plan)
    row = {
        "name": name, "N": shape[0], "d": shape[1], "k": shape[2], "m": shape[3], "ell": shape[4],
        "dtype": "float32", "plan": plan,
        "torchext_ms": t["torchext"] * 1e3, "eager_ms": t["eager"] * 1e3,
        "compile_ms": t["compile"] * 1e3 if "compile" in t else None, "floor_ms": t["floor"] * 1e3,
        "node_floor_ms": t["node floor"] * 1e3,
        "torchext_fwd_ms": tf["torchext"] * 1e3, "eager_fwd_ms": tf["eager"] * 1e3,
        "plan_gflop": flops / 1e9, "torchext_gflops": flops / t["torchext"] / 1e9,
        "saved_bytes_torchext": extra_saved_bytes(lambda: torchext.two_layer_square(z, W, V, B, A), (z, W, V, B, A)),
        "saved_bytes_eager": extra_saved_bytes(lambda: reference.two_layer_square(z, W, V, B, A), (z, W, V, B, A)),
        "saved_bytes_limit": 2 * N * shape[2] * 4,
    }
    row["vs_eager"] = row["eager_ms"] / row["torchext_ms"]
    row["vs_compile"] = row["compile_ms"] / row["torchext_ms"] if row["compile_ms"] else None
    row["vs_floor"] = row["torchext_ms"] / row["floor_ms"]
    row["fwd_vs_eager"] = row["eager_fwd_ms"] / row["torchext_fwd_ms"]
    row["plan_bytes"] = plan_bytes(shape, plan)
    row["input_sets"] = len(sets)
    return row


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # (--cpu-kernels is read before argparse runs)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all of the device's cases)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--sweep", type=int, default=12, help="random shapes in the guard-rail sweep (0: none)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocess measurement")
    ap.add_argument("--quick", action="store_true", help="1 round, short timings, 4 sweep shapes")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--cpu-kernels", default=None, choices=["auto", "avx512", "avx2", "neon", "generic"],
                    help="force torchext's CPU kernel set (and hold eager and torch.compile to a narrower x86 ISA)")
    args = ap.parse_args(argv)
    if args.cpu_kernels and any(os.environ.get(k) != v for k, v in
                                [("TORCHEXT_CPU_KERNELS", args.cpu_kernels), *EMULATED_ISA.get(args.cpu_kernels, {}).items()]):
        raise SystemExit("--cpu-kernels works from the command line only (it must act before torch loads)")
    if args.quick:
        args.rounds, args.min_run_time, args.sweep = 1, 0.2, min(args.sweep, 4)
    device = args.device
    cases = GPU_CASES if device == "cuda" else CPU_CASES
    if args.cases:
        cases = {n: cases[n] for n in args.cases.split(",")}
    torch._dynamo.config.cache_size_limit = 64
    if args.cpu_kernels in INDUCTOR_SIMDLEN:
        torch._inductor.config.cpp.simdlen = INDUCTOR_SIMDLEN[args.cpu_kernels]
    compiled = None if args.no_compile else torch.compile(reference.two_layer_square)

    card = torch.cuda.get_device_name(0) if device == "cuda" else cpu_name()
    print(f"torchext benchmark on {device} ({card}, {torch.get_num_threads()} threads), torch {torch.__version__}")
    ceilings, l2_bytes = {}, 0
    if device == "cuda":
        # Full float32 for every contender (cuBLAS too), as the targets say.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        ceilings = gpu_ceilings()
        l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
        rates = {"torch.mm": ceilings["fp32_tflops"] * 1e3}
        print(f"ceilings measured: float32 {ceilings['fp32_tflops']:.1f} TFLOP/s (8192³ product, TF32 off), "
              f"copy {ceilings['copy_gbytes_per_s']:.0f} GB/s (read + write); L2 {l2_bytes >> 20} MiB")
    else:
        rates = matmul_rates_gflops(device)
    peak = max(rates.values())
    print("float32 matmul rates measured: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
          + f" GFLOP/s; peak {peak:.1f}")
    cpu_kernels = fma_rate = None
    if device == "cpu":
        build = torchext.build_info()
        cpu_kernels = build["cpu_kernels"]["float32"]["running"]
        if cpu_kernels is None:
            raise SystemExit(build["cpu_kernels_error"])
        fma_rate = torchext._library.cpu_fma_rate_gflops(torch.get_num_threads(), 1.0)
        emulated = {k: os.environ[k] for k in EMULATED_ISA.get(args.cpu_kernels, {})}
        print(f"torchext CPU kernels: {cpu_kernels}; register-only FMA loop of that set: {fma_rate:.0f} GFLOP/s; "
              f"CPU flags: {' '.join(cpu_flags())}" + (f"; contenders held to {emulated}" if emulated else ""))

    rows, sweep, memory, denormal, bf16 = [], [], {}, {}, {}
    os.makedirs(args.out, exist_ok=True)
    # The GPU record is named after the card: <date>-<card>.json.
    label = f"cpu-{cpu_kernels}" if device == "cpu" else "-".join(card.lower().replace("nvidia", "nvidia ").split())
    stem = f"{datetime.date.today().isoformat()}-{label}"

    def partial_record(final=False):
        """The record so far, written after every case (a run cut short by a
        time limit still leaves what it measured), and at the end."""
        record = {
            "device": card, "device_type": device, "threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "torchext_build": torchext.build_info(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "matmul_peak_gflops": peak, "matmul_rates_gflops": rates, "rounds": args.rounds, "cases": rows,
            "sweep": sweep, "memory": memory, "denormal": denormal, "complete": final,
        }
        if device == "cpu":
            record.update({"cpu_kernels": cpu_kernels, "cpu_flags": cpu_flags(), "fma_rate_gflops": fma_rate,
                           "emulated_isa_env": {k: os.environ[k] for k in EMULATED_ISA.get(args.cpu_kernels, {})},
                           "inductor_simdlen": INDUCTOR_SIMDLEN.get(args.cpu_kernels)})
        if device == "cuda":
            record.update({"ceilings": ceilings, "bf16": bf16, "timing": "CUDA events, medians, rotating input sets",
                           "tf32": False})
        with open(os.path.join(args.out, stem + ".json"), "w") as fh:
            json.dump(record, fh, indent=1)
        return record

    hdr = f"{'case':<16}{'N':>8}{'d,k,m,ell':>18}{'plan':>11}{'torchext':>11}{'eager':>11}{'compile':>11}{'floor':>9}{'node':>9}{'x eager':>9}{'x compile':>10}{'/floor':>8}{'fwd x':>7}{'% peak':>8}"
    print(hdr)
    for name, shape in cases.items():
        row = run_case(name, shape, device, args.rounds, args.min_run_time, not args.no_compile, compiled, l2_bytes)
        row["fraction_of_peak"] = row["torchext_gflops"] / peak
        if fma_rate:
            row["fraction_of_fma_rate"] = row["torchext_gflops"] / fma_rate
        if ceilings:
            floor_s = max(row["plan_gflop"] / (ceilings["fp32_tflops"] * 1e3),
                          row["plan_bytes"] / (ceilings["copy_gbytes_per_s"] * 1e9))
            row["roofline_floor_ms"] = floor_s * 1e3
            row["fraction_of_floor"] = floor_s / (row["torchext_ms"] / 1e3)
        rows.append(row)
        widths = ",".join(str(x) for x in shape[1:])
        print(f"{name:<16}{str(shape[0] or '(d,)'):>8}{widths:>18}{row['plan']:>11}"
              f"{fmt(row['torchext_ms'])+'ms':>11}{fmt(row['eager_ms'])+'ms':>11}{fmt(row['compile_ms'])+'ms':>11}"
              f"{fmt(row['floor_ms'], '.2g')+'ms':>9}{fmt(row['node_floor_ms'], '.2g')+'ms':>9}"
              f"{fmt(row['vs_eager'], '.2f'):>9}{fmt(row['vs_compile'], '.2f'):>10}"
              f"{fmt(row['vs_floor'], '.2f'):>8}{fmt(row['fwd_vs_eager'], '.2f'):>7}{100 * row['fraction_of_peak']:>7.0f}%", flush=True)
        partial_record()

    if args.sweep:
        print(f"\nguard-rail sweep ({args.sweep} seeded random shapes, fwd+bwd, torchext vs eager):")
        for shape in sweep_shapes(args.sweep, seed=2026):
            z, W, V, B, A = make_case(shape, device)
            fns = {
                "torchext": lambda: torchext.two_layer_square(z, W, V, B, A).sum().backward(),
                "eager": lambda: reference.two_layer_square(z, W, V, B, A).sum().backward(),
            }
            t = interleaved_medians(fns, device, args.rounds, min(args.min_run_time, 0.3))
            entry = {"N": shape[0], "d": shape[1], "k": shape[2], "m": shape[3], "ell": shape[4],
                     "plan": TESTING._plan(*shape), "torchext_ms": t["torchext"] * 1e3,
                     "eager_ms": t["eager"] * 1e3, "vs_eager": t["eager"] / t["torchext"]}
            sweep.append(entry)
            print(f"  N={shape[0]:>6} d,k,m,ell={str(shape[1:]):<22} {entry['plan']:<10} {entry['vs_eager']:6.2f}x", flush=True)
        print(f"  min ratio over the sweep: {min(e['vs_eager'] for e in sweep):.2f}x")

    if not args.quick or args.cases:
        # Cost of denormal inputs (a report, not a test): z scaled into the
        # float32 subnormal range (below 1.2e-38), and so x = W z too.
        shape = (1024, 64, 64, 64, 64)
        z, W, V, B, A = make_case(shape, device)
        zs = z * 1e-39
        fns = {
            "torchext": lambda: torchext.two_layer_square(z, W, V, B, A).sum().backward(),
            "torchext_denormal": lambda: torchext.two_layer_square(zs, W, V, B, A).sum().backward(),
            "eager": lambda: reference.two_layer_square(z, W, V, B, A).sum().backward(),
            "eager_denormal": lambda: reference.two_layer_square(zs, W, V, B, A).sum().backward(),
        }
        t = interleaved_medians(fns, device, args.rounds, min(args.min_run_time, 0.3))
        denormal.update({"shape": shape, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                    "torchext_slowdown": t["torchext_denormal"] / t["torchext"],
                    "eager_slowdown": t["eager_denormal"] / t["eager"]})
        print(f"\ndenormal inputs at {shape}: torchext {denormal['torchext_slowdown']:.2f}x slower, "
              f"eager {denormal['eager_slowdown']:.2f}x slower than with normal inputs")

    if device == "cuda" and "gpu-large" in cases:
        bf16.update(bf16_check(cases["gpu-large"]))
        print(f"\nbfloat16 at gpu-large: {bf16['speedup']:.2f}x float32's speed; relative error of f "
              f"against float64 on the bf16 inputs {bf16['bf16_rel_err_f_vs_float64']:.2e}")

    if not args.no_memory and device == "cpu" and "large" in cases:
        for who in ("torchext", "eager"):
            memory[f"peak_rss_added_{who}_bytes"] = peak_rss_added(cases["large"], who)
        print(f"\npeak RSS added by one fwd+bwd at 'large' (fresh process): "
              f"torchext {memory['peak_rss_added_torchext_bytes'] / 2**20:.0f} MiB, "
              f"eager {memory['peak_rss_added_eager_bytes'] / 2**20:.0f} MiB")

    print("\ntargets (fwd+bwd speed-up):")
    for row in rows:
        te, tc = TARGETS.get(row["name"], (None, None))
        ok_e = te is None or row["vs_eager"] >= te
        ok_c = tc is None or (row["vs_compile"] or 0) >= tc
        print(f"  {row['name']:<16} vs eager {row['vs_eager']:.2f}x (target {te}x) {'ok' if ok_e else 'MISSED'}; "
              f"vs compile {fmt(row['vs_compile'], '.2f')}x (target {tc}x) {'ok' if ok_c else 'MISSED'}")
        if not ok_e:  # what the target leaves the route's own work
            print(f"    the target allows {row['eager_ms'] / te:.3g} ms a step, of which the C++ node floor takes "
                  f"{row['node_floor_ms']:.3g} ms; torchext's work above that floor is "
                  f"{row['torchext_ms'] - row['node_floor_ms']:.3g} ms"
                  + (f", of which its multiply-adds would take {row['plan_gflop'] / fma_rate * 1e3:.3g} ms "
                     f"at the FMA loop's rate" if fma_rate else ""))
            b = product_budget(row, te, fma_rate, args.min_run_time / 2) if fma_rate and (row["N"] or 0) > 1 else None
            if b:
                row["product_budget"] = b
                need = b["fraction_of_fma_rate_needed"]
                print(f"    its per-sample work runs at {100 * b['fraction_of_fma_rate_now']:.0f}% of the FMA loop "
                      f"(one thread's time, split over the threads; {b['parallel_overhead_ms']:.3g} ms more "
                      f"on them); the target needs "
                      + (f"{100 * need:.0f}%" if need is not None else "more than products that take no time")
                      + " with every other cost as measured")
    for line in cpu_extra_targets(rows, sweep) if device == "cpu" else []:
        print("  " + line)

    record = partial_record(final=True)
    plotted = plot(rows, sweep, os.path.join(args.out, stem + ".png"), card)
    with open(os.path.join(args.out, stem + ".md"), "w") as fh:
        fh.write(markdown_table(record))
    print(f"\nwrote {os.path.join(args.out, stem)}.json, .md" + (" and .png" if plotted else ""))
    return record


def product_budget(row, target, fma_rate, min_run_time):
    """What a missed CPU target asks of the per-sample products. The forward
    and backward ops, timed alone at N and at one sample (same plan, W and V
    gradients), on one thread and on all: the difference is the per-sample
    work on one thread, against the plan's multiply-adds the same difference
    of N makes. Returns its rate now (one thread's time divided by the thread
    count, against the FMA loop of all threads, as `% FMA`), the two-thread
    overhead above that ideal split, and the rate the target needs with
    every other cost of the step as measured (None: unreachable even with
    products that take no time)."""
    N = row["N"]
    shape = (N, row["d"], row["k"], row["m"], row["ell"])
    z, W, V, B, A = (t.detach() for t in make_case(shape, "cpu"))
    mask = [False, True, True, False, False]
    threads = torch.get_num_threads()
    times = {}
    for n in (N, 1):
        zn = z[:n]
        f, r, q, state = torch.ops.torchext._two_layer_square_forward(zn, W, V, B, A, row["plan"], True)
        g = torch.ones(()).expand(f.shape)  # as f.sum() gives it
        ops = (lambda: torch.ops.torchext._two_layer_square_forward(zn, W, V, B, A, row["plan"], True),
               lambda: torch.ops.torchext._two_layer_square_backward(g, zn, W, V, B, A, r, q, state, mask))
        for t in (1, threads):
            times[n, t] = sum(benchmark.Timer("fn()", globals={"fn": fn}, num_threads=t)
                              .blocked_autorange(min_run_time=min_run_time).median for fn in ops)
    one_thread = times[N, 1] - times[1, 1]
    if one_thread <= 0:  # no per-sample work to see (a batch too small for the timer)
        return None
    flops = plan_flops(shape, row["plan"]) - plan_flops((1,) + shape[1:], row["plan"])
    split = one_thread / threads
    left = row["eager_ms"] / 1e3 / target - (row["torchext_ms"] / 1e3 - split)
    return {"per_sample_one_thread_ms": one_thread * 1e3,
            "fraction_of_fma_rate_now": flops / split / (fma_rate * 1e9),
            "parallel_overhead_ms": (times[N, threads] - times[1, threads] - split) * 1e3,
            "fraction_of_fma_rate_needed": flops / left / (fma_rate * 1e9) if left > 0 else None}


def cpu_extra_targets(rows, sweep):
    """#3's other CPU targets: seed-vector against the no-op floor, large
    against the FMA rate, forward-only speed-ups, the sweep's minimum."""
    out = []
    for row in rows:
        if row["name"] == "seed-vector":
            out.append(f"seed-vector / floor {row['vs_floor']:.2f} (target <= 1.25) {'ok' if row['vs_floor'] <= 1.25 else 'MISSED'}")
        if row["name"] == "large" and row.get("fraction_of_fma_rate") is not None:
            f = row["fraction_of_fma_rate"]
            out.append(f"large at {100 * f:.0f}% of the FMA rate (target >= 50%) {'ok' if f >= 0.5 else 'MISSED'}")
    if rows and rows[0]["name"] in CPU_CASES:
        worst = min(rows, key=lambda r: r["fwd_vs_eager"])
        out.append(f"forward-only, lowest {worst['fwd_vs_eager']:.2f}x at {worst['name']} (target >= 1.4) "
                   f"{'ok' if worst['fwd_vs_eager'] >= 1.4 else 'MISSED'}")
    if sweep:
        low = min(e["vs_eager"] for e in sweep)
        out.append(f"sweep minimum {low:.2f}x (target >= 0.95) {'ok' if low >= 0.95 else 'MISSED'}")
    return out


def markdown_table(record):
    """The README's table, from a run's record."""
    lines = [
        f"Measured {record['date']} on {record['device']} ({record['device_type']}, {record['threads']} threads), "
        f"torch {record['torch_version']}, float32; median ms of fwd+bwd (W, V trainable, loss = f.sum()); "
        f"best of {record['rounds']} interleaved rounds. Float32 "
        + ("8192³ (TF32 off)" if record.get("ceilings") else "1024³") + " product rates measured in the same run: "
        + ", ".join(f"{k} {v:.0f}" for k, v in record.get("matmul_rates_gflops", {}).items())
        + f" GFLOP/s; % of peak is against the faster ({record['matmul_peak_gflops']:.0f}).",
    ]
    if record.get("cpu_kernels"):
        env = record.get("emulated_isa_env") or {}
        lines += ["", f"torchext CPU kernel set: **{record['cpu_kernels']}**; its register-only FMA loop ran at "
                      f"{record['fma_rate_gflops']:.0f} GFLOP/s (% FMA below is against it). CPU flags: "
                      f"{' '.join(record.get('cpu_flags', []))}."
                      + (f" Every contender held to {record['cpu_kernels']}: {env}, torch.compile simdlen "
                         f"{record.get('inductor_simdlen')}." if env else "")]
    lines += [
        "",
        "| case | N | d, k, m, ℓ | plan | torchext | eager | torch.compile | no-op floor | C++ node floor | × eager | × compile | / no-op floor | fwd-only × eager | % of peak | % FMA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["cases"]:
        lines.append(
            f"| {r['name']} | {r['N'] or '(d,)'} | {r['d']}, {r['k']}, {r['m']}, {r['ell']} | {r['plan']} | "
            f"{r['torchext_ms']:.3g} | {r['eager_ms']:.3g} | {fmt(r['compile_ms'])} | {r['floor_ms']:.2g} | "
            f"{fmt(r.get('node_floor_ms'), '.2g')} | "
            f"{r['vs_eager']:.2f} | {fmt(r['vs_compile'], '.2f')} | {r['vs_floor']:.2f} | {r['fwd_vs_eager']:.2f} | "
            f"{100 * r['fraction_of_peak']:.0f}% | "
            + (f"{100 * r['fraction_of_fma_rate']:.0f}% |" if r.get("fraction_of_fma_rate") else "- |")
        )
    if record.get("ceilings"):
        c = record["ceilings"]
        lines += ["", f"Ceilings measured in the same run: float32 {c['fp32_tflops']:.1f} TFLOP/s, copy "
                      f"{c['copy_gbytes_per_s']:.0f} GB/s. Fraction of the roofline floor (max of FLOPs over the "
                      "float32 rate and bytes over the copy rate) reached: "
                      + ", ".join(f"{r['name']} {100 * r['fraction_of_floor']:.0f}%" for r in record["cases"]) + "."]
        if record.get("bf16"):
            b = record["bf16"]
            lines += ["", f"bfloat16 inputs at gpu-large: {b['speedup']:.2f}× float32's speed; relative error of f "
                          f"against float64 on the same inputs {b['bf16_rel_err_f_vs_float64']:.1e}."]
    if record["sweep"]:
        ratios = [e["vs_eager"] for e in record["sweep"]]
        lines += ["", f"Guard-rail sweep over {len(ratios)} seeded random shapes (in the JSON): "
                      f"speed-up vs eager from {min(ratios):.2f}× to {max(ratios):.2f}×."]
    mem = record.get("memory") or {}
    if mem.get("peak_rss_added_torchext_bytes"):
        lines += ["", f"Peak RSS added by one fwd+bwd at `large` (fresh process): torchext "
                      f"{mem['peak_rss_added_torchext_bytes'] / 2**20:.0f} MiB, eager "
                      f"{mem['peak_rss_added_eager_bytes'] / 2**20:.0f} MiB."]
    return "\n".join(lines) + "\n"


def plot(rows, sweep, path, card):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install '.[bench]')")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["name"] for r in rows]
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [r["vs_eager"] for r in rows], 0.4, label="vs eager")
    ax1.bar([i + 0.2 for i in x], [r["vs_compile"] or 0 for r in rows], 0.4, label="vs torch.compile")
    ax1.set_xticks(list(x), names, rotation=30, ha="right")
    ax1.set_yscale("log")
    ax1.axhline(1, color="k", lw=0.8)
    ax1.set_ylabel("speed-up, fwd+bwd (×)")
    ax1.set_title("cases")
    ax1.legend()
    if sweep:
        work = [(e["N"] or 1) * (e["k"] * e["d"] + e["m"] * e["k"] + e["ell"] * e["m"]) for e in sweep]
        ax2.scatter(work, [e["vs_eager"] for e in sweep], c=["C0" if e["plan"] == "direct" else "C1" if e["plan"] == "folded" else "C2" for e in sweep])
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.axhline(1, color="k", lw=0.8)
        ax2.set_xlabel("eager multiply-adds per forward, N·(kd + mk + ℓm)")
        ax2.set_ylabel("speed-up vs eager (×)")
        ax2.set_title("random-shape sweep (blue direct, orange folded, green quadratic)")
    fig.suptitle(f"torchext fwd+bwd speed-up, float32, {card}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


if __name__ == "__main__":
    main()
