"""Mutation check: does the test suite catch the bugs it is meant to?

Each mutation below is a small, plausible bug written into a copy of the
source tree; the copy is built (CPU kernels) and the tests that should catch it
are run. A mutation that no test fails is reported as SURVIVED.

    python scripts/mutation_check.py [--out FILE] [--only NAME ...]

Run from the repository root with the project's venv active (torch installed,
the build's requirements present). Takes a build per mutation (minutes each).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (file, old text, new text, tests to run)
CORE_TESTS = ["tests/test_correctness.py", "tests/test_plans.py", "tests/test_special_values.py"]
# The poisoned-buffer test alone: stale memory shows there whatever malloc reuses.
STALE_TEST = "tests/test_plans.py::test_buffers_never_show_stale_memory"
MUTATIONS = {
    # ReLU's derivative dropped from each plan's backward.
    "relu-mask-direct": ("csrc/cpu/elementwise.h",
                         "p[i * ldp + j] = r[i * k + j] <= T(0) ? T(0) : p[i * ldp + j];",
                         "p[i * ldp + j] = p[i * ldp + j];", CORE_TESTS),
    "relu-mask-folded-quadratic": ("csrc/cpu/elementwise.h",
                                   "        p[i * ldo + j] = r[i * k + j] <= T(0) ? T(0) : v;",
                                   "        p[i * ldo + j] = v;", CORE_TESTS),
    # (the SIMD kernels' one select: the narrow kernels' and the chunks' relu_grads)
    "relu-mask-simd-kernels": ("csrc/cpu/simd_kernels_impl.h",
                               "{ return V::where_active(r, V::mul(V::add(g, g), q)); }",
                               "{ return V::mul(V::add(g, g), q); }",
                               CORE_TESTS + ["tests/test_simd_kernels.py"]),
    # Half inputs computed in their own dtype.
    "half-accumulation": ("csrc/buffers.cpp",
                          "  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;",
                          "  return t;", ["tests/test_correctness.py"]),
    # The last row of every chunk's tail left out (forward and backward).
    "dropped-tail-row": ("csrc/cpu/two_layer_square_cpu.cpp",
                         "const int64_t n = std::min(bp.chunk_rows, dims.N - r0);",
                         "const int64_t n = std::min(bp.chunk_rows, dims.N - r0 - (r0 + bp.chunk_rows >= dims.N && dims.N - r0 > 1 ? 1 : 0));",
                         CORE_TESTS),
    # A view's strides ignored: non-contiguous inputs read as if contiguous.
    "swapped-stride": ("csrc/buffers.cpp",
                       "    return t.scalar_type() == cdt && t.is_contiguous() ? t : t.to(cdt).contiguous();",
                       "    return t.scalar_type() == cdt ? t : t.to(cdt).contiguous();",
                       ["tests/test_correctness.py"]),
    # ∂A with the wrong sign (the Gram route and the direct chain).
    "wrong-sign-dA-gram": ("csrc/head.cpp",
                           "    bufs.acc[kA] = MG.mul(factors.M).sum(1);",
                           "    bufs.acc[kA] = MG.mul(factors.M).sum(1).neg();", CORE_TESTS),
    "wrong-sign-dA-direct": ("csrc/cpu/chunk_kernels.h",
                             "        gA[j] += gc[i] * (y_in[i * ld_in + j] * y_in[i * ld_in + j]);",
                             "        gA[j] -= gc[i] * (y_in[i * ld_in + j] * y_in[i * ld_in + j]);",
                             CORE_TESTS),
    # A partition's first chunk adding to its uninitialised gradient buffers
    # rather than writing them (caught only where the buffers are poisoned).
    "first-chunk-adds": ("csrc/cpu/chunk_kernels.h",
                         "  const T beta = first ? T(0) : T(1);",
                         "  const T beta = T(1);", [STALE_TEST]),
    "direct-dA-not-zeroed": ("csrc/cpu/chunk_kernels.h",
                             "    if (first) std::fill(gA, gA + ell, T(0));",
                             "", [STALE_TEST]),
    # The sequential-BLAS guard around the parallel_for rather than inside
    # it: the calling thread, and every torch op it runs later, would be left
    # on one OpenMP thread.
    "blas-guard-outside-parallel-for": ("csrc/cpu/blas.h",
                                        "  at::parallel_for(0, threads, 1, [&](int64_t own, int64_t own_end) {\n"
                                        "    // [own, own_end): this call's own tasks (all of them where it runs alone)\n"
                                        "    const SequentialBlas sequential_blas;\n",
                                        "  const SequentialBlas sequential_blas;\n"
                                        "  at::parallel_for(0, threads, 1, [&](int64_t own, int64_t own_end) {\n"
                                        "    // [own, own_end): this call's own tasks (all of them where it runs alone)\n",
                                        ["tests/test_determinism.py::test_kernels_use_every_thread_and_leave_torchs_threads_alone[direct]"]),
}


def copy_tree(dst):
    ignore = shutil.ignore_patterns(".venv", ".ci-venvs", "build", "*.so", ".git", "__pycache__")
    shutil.copytree(ROOT, dst, ignore=ignore)


def run(name, file, old, new, tests):
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        tree = os.path.join(tmp, "src")
        copy_tree(tree)
        path = os.path.join(tree, file)
        with open(path) as fh:
            text = fh.read()
        if text.count(old) < 1:
            return {"mutation": name, "result": "NOT APPLIED (source changed: update the script)"}
        with open(path, "w") as fh:
            fh.write(text.replace(old, new))
        env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
        env.pop("FORCE_CUDA", None)
        start = time.time()
        build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                               capture_output=True, text=True)
        if build.returncode != 0:
            return {"mutation": name, "result": "NOT BUILT (the mutation does not compile: fix the script)",
                    "detail": build.stderr[-500:]}
        env["PYTHONPATH"] = tree
        test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=tree, env=env, capture_output=True, text=True)
        failed = [line.split()[1] for line in test.stdout.splitlines() if line.startswith("FAILED")]
        return {"mutation": name,
                "result": "CAUGHT" if test.returncode != 0 else "SURVIVED",
                "first_failure": failed[0] if failed else None,
                "summary": test.stdout.strip().splitlines()[-1] if test.stdout.strip() else "",
                "seconds": round(time.time() - start)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--only", nargs="*", choices=list(MUTATIONS), help="run only these")
    args = parser.parse_args()
    results = []
    for name in args.only or MUTATIONS:
        res = run(name, *MUTATIONS[name])
        print(json.dumps(res), flush=True)
        results.append(res)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    survived = [r["mutation"] for r in results if r["result"] != "CAUGHT"]
    print("survived or not applied:", survived or "none")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
