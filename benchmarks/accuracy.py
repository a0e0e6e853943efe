"""Accuracy of each plan in float32 against float64, next to eager float32.

    python benchmarks/accuracy.py

error = ‖out − out₆₄‖₂ / ‖out₆₄‖₂ for f and each gradient (of Σ g·f, g random),
out₆₄ the float64 eager reference on the same (float32-rounded) inputs. Prints
a table for random inputs of several shape families and for inputs built to
cancel (torchext.testing.cancelling_inputs); writes JSON to benchmarks/results/.
"""
import datetime
import json
import os

import torch

import torchext
from torchext import reference
from torchext.testing import cancelling_inputs

OUTPUTS = ("f", "dz", "dW", "dV", "dB", "dA")
FAMILIES = {  # (N, d, k, m, ell)
    "square": (512, 64, 64, 64, 64),
    "ell<k": (512, 32, 96, 48, 8),
    "ell>k": (512, 32, 16, 64, 128),
    "wide": (256, 64, 64, 1024, 1024),
}


def random_inputs(shape, seed):
    N, d, k, m, ell = shape
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(N, d, generator=g), torch.randn(k, d, generator=g) / d ** 0.5,
        torch.randn(m, k, generator=g) / k ** 0.5, torch.randn(ell, m, generator=g) / m ** 0.5,
        torch.randn(1, ell, generator=g),
    ]


def outputs(fn, inputs, g):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    f = fn(*leaves)
    return [f.detach()] + list(torch.autograd.grad(f, leaves, g.to(f.dtype)))


def errors(inputs, seed=1):
    g = torch.randn(inputs[0].shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = outputs(reference.two_layer_square, [t.double() for t in inputs], g)

    def rel(outs):
        return [((o.double() - r).norm() / r.norm()).item() for o, r in zip(outs, ref)]

    table = {"eager": rel(outputs(reference.two_layer_square, inputs, g))}
    for plan in ("direct", "folded", "quadratic"):
        table[plan] = rel(outputs(lambda *a: torchext.two_layer_square(*a, plan=plan), inputs, g))
    return table


def show(title, table):
    print(f"\n{title}")
    print(f"  {'':<10}" + "".join(f"{o:>10}" for o in OUTPUTS))
    for who, errs in table.items():
        print(f"  {who:<10}" + "".join(f"{e:>10.1e}" for e in errs))


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    record = {"torch_version": torch.__version__, "date": datetime.date.today().isoformat(), "random": {}, "cancelling": None}
    for name, shape in FAMILIES.items():
        table = errors(random_inputs(shape, seed=0))
        record["random"][name] = {"shape": shape, "errors": table}
        show(f"random inputs, {name} (N, d, k, m, ell) = {shape}", table)
    table = errors(cancelling_inputs())
    record["cancelling"] = table
    show("inputs built to cancel (torchext.testing.cancelling_inputs: mixed-sign A, |y| ≪ ‖B‖‖V r‖)", table)
    out = args.out
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{record['date']}-accuracy.json")
    with open(path, "w") as fh:
        json.dump(record, fh, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
