"""python -m torchext: how torchext was built, a gradient check of the fused
operator against the eager reference, and a short teacher-student training run."""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

import torchext
from torchext import reference


def report_build(full=False):
    info = torchext.build_info()
    running = info["cpu_kernels"]["float32"]["running"]
    cpu = f"CPU (float32: {running} kernels)" if running else f"CPU ({info['cpu_kernels_error']})"
    kernels = cpu + (f" + CUDA {info['cuda_version']} (archs {info['cuda_archs']})" if info["cuda_kernels"] else "")
    print(f"torchext {torchext.__version__}: built against torch {info['torch_version']}, running torch {torch.__version__}")
    print(f"  kernels: {kernels}{' [DEBUG build]' if info['debug'] else ''}")
    print(f"  library: {info['library']}")
    if torch.cuda.is_available():
        print(f"  GPU: {torch.cuda.get_device_name(0)}")
    if full:
        report_details(info)


def report_details(info):
    """What a bug report needs beyond the summary: versions, compilers and which
    kernel set each device runs, and why."""
    float32 = info["cpu_kernels"]["float32"]
    if info["cpu_kernels_error"]:
        cpu_set = f"none: {info['cpu_kernels_error']}"
    else:
        env = os.environ.get("TORCHEXT_CPU_KERNELS") or "auto"
        cpu_set = (f"float32 {float32['running']} (compiled: {', '.join(float32['compiled'])}; "
                   f"TORCHEXT_CPU_KERNELS={env}), float64 generic")
    cpu_set += f"; generic kernels call {info['cpu_blas'] or 'no BLAS (portable loops)'}"
    if info["cuda_kernels"]:
        cuda_set = ("aten (cuBLAS; TORCHEXT_CUDA_KERNELS=aten)" if os.environ.get("TORCHEXT_CUDA_KERNELS") == "aten"
                    else "fused (quadratic and direct-plan kernels; ATen/cuBLAS for the rest)")
    else:
        cuda_set = "not built"
    rows = [
        ("python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("platform", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("torch (built against)", info["torch_version"]),
        ("torch (running)", f"{torch.__version__}, CUDA {torch.version.cuda or 'none (CPU-only build)'}"),
        ("torch CXX11 ABI", str(torch.compiled_with_cxx11_abi())),
        ("C++ compiler", info["cxx_compiler"] or "not recorded"),
        ("CUDA kernels", f"CUDA {info['cuda_version']}, archs {info['cuda_archs']}" if info["cuda_kernels"] else "no"),
        ("CUDA compiler", info["cuda_compiler"] or ("not recorded" if info["cuda_kernels"] else "-")),
        ("CPU kernel set", cpu_set),
        ("CUDA kernel set", cuda_set),
        ("GPUs visible", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"),
        ("threads", str(torch.get_num_threads())),
        ("debug build", str(info["debug"])),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def gradient_check(device, seed):
    """The problem statement's setting: z a single vector, small d, k, m, ell."""
    d, k, m, ell = 6, 5, 4, 3
    gen = torch.Generator().manual_seed(seed)
    opts = {"dtype": torch.float64}
    z = torch.randn(d, generator=gen, **opts)
    W, V = torch.randn(k, d, generator=gen, **opts), torch.randn(m, k, generator=gen, **opts)
    B, A = torch.randn(ell, m, generator=gen, **opts), torch.randn(1, ell, generator=gen, **opts)
    inputs = [t.to(device).requires_grad_() for t in (z, W, V, B, A)]
    print(f"\nGradient check (float64, z in R^{d}, W {k}x{d}, V {m}x{k}, B {ell}x{m}, A 1x{ell}, {device}):")
    f = torchext.two_layer_square(*inputs)
    grads = torch.autograd.grad(f, inputs)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    f_ref = reference.two_layer_square(*leaves)
    grads_ref = torch.autograd.grad(f_ref, leaves)

    # The closed forms: dV = 2 Bᵀ(a⊙y) rᵀ, dW = 2 (h ⊙ Vᵀ Bᵀ(a⊙y)) zᵀ.
    zz, WW, VV, BB, AA = (t.detach() for t in inputs)
    x = WW @ zz
    r, h = torch.relu(x), (x > 0).to(x.dtype)
    y = BB @ VV @ r
    s = BB.T @ (AA.reshape(-1) * y)
    closed = {"dV": 2 * torch.outer(s, r), "dW": 2 * torch.outer(h * (VV.T @ s), zz)}

    ok = True
    rows = [("f", f, f_ref)] + [(f"d{n}", g, gr) for n, g, gr in zip("zWVBA", grads, grads_ref)]
    rows += [(f"{n} (closed form)", grads[1 if n == "dW" else 2], c) for n, c in closed.items()]
    for name, got, want in rows:
        err = ((got - want).norm() / want.norm().clamp_min(1e-300)).item()
        passed = err < 1e-10
        ok &= passed
        print(f"  {name:<16} relative error {err:.1e}  {'ok' if passed else 'FAIL'}")
    passed = torch.autograd.gradcheck(torchext.two_layer_square, inputs)
    ok &= passed
    print(f"  torch.autograd.gradcheck: {'passed' if passed else 'FAILED'}")
    print(f"Gradient check {'PASSED' if ok else 'FAILED'}")
    return ok


def train(device, steps, seed):
    d, k, m, ell, batch = 16, 64, 32, 16, 256
    torch.manual_seed(seed)
    teacher = torchext.TwoLayerSquareNet(d, k, m, ell, device=device)
    student = torchext.TwoLayerSquareNet(d, k, m, ell, A=teacher.A, B=teacher.B, device=device)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    z_val = torch.randn(4096, d, device=device)
    with torch.no_grad():
        target_val = teacher(z_val)

    def val_loss():
        with torch.no_grad():
            return torch.mean((student(z_val) - target_val) ** 2).item()

    print(f"\nTraining a TwoLayerSquareNet(d={d}, k={k}, m={m}, ell={ell}) student to match a fixed teacher "
          f"(A, B shared and fixed; batch {batch}, Adam, {steps} steps, {device}):")
    first = val_loss()
    print(f"  step {0:>4}/{steps}  validation loss {first:.4e}")
    for step in range(1, steps + 1):
        z = torch.randn(batch, d, device=device)
        with torch.no_grad():
            target = teacher(z)
        loss = torch.mean((student(z) - target) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 6) == 0 or step == steps:
            print(f"  step {step:>4}/{steps}  validation loss {val_loss():.4e}", flush=True)
    last = val_loss()
    print(f"Loss went from {first:.4e} to {last:.4e} ({first / max(last, 1e-30):.1f}x lower)")
    return last < first


def time_steps(device, seed, reps=60):
    """Median time of one training step (forward, backward, optimizer), fused vs eager,
    interleaved so both see the same machine load."""
    d, k, m, ell, batch = 16, 64, 32, 16, 256
    torch.manual_seed(seed)
    net = torchext.TwoLayerSquareNet(d, k, m, ell, device=device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    z = torch.randn(batch, d, device=device)
    fns = {
        "fused": lambda: net(z),
        "eager": lambda: reference.two_layer_square(z, net.W, net.V, net.B, net.A),
    }
    times = {name: [] for name in fns}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for i in range(reps + 5):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            loss = fn().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            if i >= 5:
                times[name].append(time.perf_counter() - t0)
    fused, eager = (statistics.median(times[n]) * 1e3 for n in ("fused", "eager"))
    print(f"\nTime per training step (batch {batch}, median of {reps}): fused {fused:.3f} ms, "
          f"eager {eager:.3f} ms ({eager / fused:.2f}x)")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m torchext", description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=positive_int, default=300, help="training steps (at least 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--build-info", action="store_true", help="only report how torchext was built")
    args = parser.parse_args(argv)
    report_build(full=args.build_info)
    if args.build_info:
        return 0
    if args.device == "cuda" and not (torch.cuda.is_available() and torchext.build_info()["cuda_kernels"]):
        print("--device cuda needs a GPU and a torchext built with CUDA kernels", file=sys.stderr)
        return 2
    ok = gradient_check(args.device, args.seed)
    ok &= train(args.device, args.steps, args.seed)
    time_steps(args.device, args.seed)
    print("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
