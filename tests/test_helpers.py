"""The test helpers do what the tests rely on them for."""
import torch

from cases import SHAPES, Case


def test_cases_are_what_they_say():
    # Seeds are fixed per case; views are views; kinks and dead units exist.
    a, b = Case("primes").inputs(), Case("primes").inputs()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], Case("primes", plan="direct").inputs()[0])
    for layout in ("transposed", "strided", "expanded", "offset"):
        z, W, *_ = Case("saved", layout=layout).inputs()
        assert not (z.is_contiguous() and W.is_contiguous()) or z.storage_offset(), layout
    z, W, *_ = Case("primes", values="kinks").inputs()
    assert ((z @ W.T) == 0).any(dim=1)[::3].all() and ((z @ W.T)[:, 0] == 0).all()
    z, W, *_ = Case("primes", values="dead-units").inputs()
    assert ((z @ W.T)[:, ::2] < 0).all()
    assert set(SHAPES) >= {"chunk-and-tail", "partitions", "partitions-saved", "split-saved", "split-recomputed",
                          "narrow-odd-k"}
