"""The shared case generator: the inputs every correctness, special-value,
autograd, compile, export and torch.func test draws from.

A case is a shape family, a plan (each forced, plus "auto"), a dtype, a memory
layout and a kind of values. Its seed is derived from its id (crc32, stable
across processes, unlike hash()), so a failure reproduces from the test id.

The shape families make every path of the CPU kernels run: one chunk and its
tail, several chunks, several chunks per partition (partitions hold whole
chunks; chunks are 512 to 1024 rows at these widths), small batches split
into chunks of 32 to 128 rows, r and q saved (d + k >= 64) and recomputed,
the narrow float32 kernels (k <= 32) with k not a multiple of their 8-unit
blocks, widths of 1, primes, a vector z, two leading dimensions, an empty
batch and zero widths."""
import dataclasses
import zlib

import torch

PLANS = ("auto", "direct", "folded", "quadratic")

# name -> (batch shape of z, d, k, m, ell)
SHAPES = {
    "ones": ((1,), 1, 1, 1, 1),
    "vector": ((), 16, 16, 16, 16),
    "primes": ((13,), 11, 7, 5, 3),
    "two-leading": ((3, 4), 5, 6, 7, 2),
    "ell>k": ((29,), 7, 5, 13, 31),
    "narrow-odd-k": ((45,), 6, 13, 7, 5),
    "odd-widths": ((37,), 17, 33, 19, 9),
    "saved": ((70,), 40, 30, 10, 6),
    "saved-small": ((3,), 60, 4, 3, 2),
    "chunk-and-tail": ((1100,), 8, 12, 10, 6),
    "partitions": ((9223,), 8, 12, 10, 6),
    "partitions-saved": ((4611,), 40, 30, 10, 6),
    # Batches of fewer chunks than partitions, with enough work per sample
    # that they are cut into small chunks (and partitions) anyway: saved (5
    # forward chunks of 64; direct backward 5 partitions of 64), and
    # recomputed (direct: 10 chunks of 32 in 5 partitions). test_plans.py
    # checks these splits.
    "split-saved": ((300,), 48, 64, 40, 24),
    "split-recomputed": ((300,), 24, 32, 96, 80),
    "empty-batch": ((0,), 5, 4, 3, 2),
    "zero-k": ((6,), 4, 0, 3, 2),
    "zero-m-ell": ((6,), 4, 3, 0, 0),
    # "auto" resolves to direct up to 223 samples and folded above when
    # training (up to 68 for inference), r and q saved: slices of this batch
    # cross both boundaries.
    "auto-boundary": ((1000,), 3, 61, 64, 3),
}
# Shapes small enough for gradcheck, the torch.func transforms, compile and export.
SMALL = ("ones", "vector", "primes", "two-leading", "ell>k", "narrow-odd-k", "saved-small", "empty-batch")

LAYOUTS = ("contiguous", "transposed", "strided", "expanded", "offset")
VALUES = ("random", "kinks", "dead-units")


@dataclasses.dataclass(frozen=True)
class Case:
    shape: str
    plan: str = "auto"
    dtype: torch.dtype = torch.float64
    layout: str = "contiguous"
    values: str = "random"

    @property
    def id(self):
        dtype = str(self.dtype).replace("torch.", "")
        return "-".join([self.shape, self.plan, dtype, self.layout, self.values])

    @property
    def seed(self):
        return zlib.crc32(self.id.encode())

    @property
    def dims(self):
        return SHAPES[self.shape]

    def inputs(self, device="cpu", requires_grad=False):
        """(z, W, V, B, A), fresh from this case's seed."""
        batch, d, k, m, ell = self.dims
        g = torch.Generator().manual_seed(self.seed)

        def rnd(*s, scale=1.0):
            return torch.randn(*s, generator=g, dtype=torch.float64) * scale

        z = rnd(*batch, d)
        W = rnd(k, d, scale=d ** -0.5 if d else 1.0)
        V = rnd(m, k, scale=k ** -0.5 if k else 1.0)
        B = rnd(ell, m, scale=m ** -0.5 if m else 1.0)
        A = rnd(1, ell)
        z, W = _values(self.values, z, W)
        # The layout made on the device: .to(device) would copy a view into
        # a contiguous tensor.
        out = [_layout(self.layout, t.to(device=device, dtype=self.dtype), i) for i, t in enumerate((z, W, V, B, A))]
        return [t.requires_grad_() if requires_grad and t.is_leaf else t for t in out]


def _values(kind, z, W):
    if kind == "kinks":
        # Unit 0 sits at x = 0 in every sample; every third sample has x = 0
        # in every unit (ReLU's derivative there is 0, as in eager).
        if W.shape[0]:
            W[0] = 0
        z.reshape(-1, z.shape[-1])[::3] = 0
    elif kind == "dead-units":
        # Even units are inactive in every sample (x < 0 throughout).
        z = z.abs() + 0.1
        W[::2] = -W[::2].abs() - 0.1
    return z, W


def _layout(kind, t, index):
    """The same values in another memory layout (never a copy of the caller's)."""
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided":
        return torch.stack([t, t], -1)[..., 0]
    if kind == "expanded" and t.numel() and t.dim() >= 1 and index == 0:
        # z's samples all equal one row, broadcast with stride 0.
        return t.reshape(-1, t.shape[-1])[:1].expand(t.reshape(-1, t.shape[-1]).shape).reshape(t.shape)
    if kind == "offset":
        flat = torch.cat([t.new_zeros(3), t.reshape(-1)])
        return flat[3:].view(t.shape)
    return t


def net_of(case, inputs):
    """A TwoLayerSquareNet under the case's plan holding the case's W, V, B and
    A, all four trainable (so every gradient is checked)."""
    import torchext

    z, W, V, B, A = (t.detach() for t in inputs)
    net = torchext.TwoLayerSquareNet(W.shape[1], W.shape[0], V.shape[0], B.shape[0], A=A, B=B,
                                     trainable_AB=True, plan=case.plan, dtype=W.dtype, device=W.device)
    with torch.no_grad():
        net.W.copy_(W)
        net.V.copy_(V)
    return net


def module_leaves(case, device="cpu"):
    """A net_of the case and its five leaves: z (requiring grad) and the net's W, V, B, A."""
    inputs = case.inputs(device)
    net = net_of(case, inputs)
    return net, [inputs[0].requires_grad_(), net.W, net.V, net.B, net.A]


def cases(shapes=tuple(SHAPES), plans=PLANS, dtypes=(torch.float64,), layouts=("contiguous",),
          values=("random",)):
    """Every combination, as pytest parameters with their ids."""
    import pytest

    out = []
    for shape in shapes:
        for plan in plans:
            for dtype in dtypes:
                for layout in layouts:
                    for value in values:
                        case = Case(shape, plan, dtype, layout, value)
                        out.append(pytest.param(case, id=case.id))
    return out
