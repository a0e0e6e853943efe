"""`TwoLayerSquareNet`: the drop-in nn.Module around the fused operator."""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import nn

from .function import PLANS, two_layer_square


class TwoLayerSquareNet(nn.Module):
    r"""f(z) = A · (B · V · relu(W z))², one value per sample of z (..., d).

    Parameters ``W`` (k, d) and ``V`` (m, k) are trained. ``B`` (ell, m) and ``A``
    (1, ell) are fixed buffers, as in the problem statement, unless
    ``trainable_AB=True`` makes them Parameters. Pass your own ``A``/``B``
    (copied; ``A`` may be (ell,) or (1, ell); without ``dtype``/``device`` they
    set the module's) or get the random initialisation:

    * ``W`` ~ N(0, 2/d)   (He: relu(W z) keeps E r² ≈ |z|²/d),
    * ``V`` ~ N(0, 1/k),  ``B`` ~ N(0, 1/m)   (keep each layer's output scale),
    * ``A`` ~ U(0, 2/ell) (positive weights with mean 1/ell, so f is an average
      of squares: f ≈ 1 for standard-normal z, whatever the widths).

    ``reset_parameters()`` redraws W and V, and A and B unless they were passed in.
    ``plan`` is passed to :func:`torchext.two_layer_square` ("auto" by default).
    """

    W: nn.Parameter
    V: nn.Parameter
    A: torch.Tensor
    B: torch.Tensor

    def __init__(
        self,
        d: int,
        k: int,
        m: int,
        ell: int,
        *,
        A: Optional[torch.Tensor] = None,
        B: Optional[torch.Tensor] = None,
        trainable_AB: bool = False,
        plan: str = "auto",
        device: Optional[torch.types.Device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        for name, value in (("d", d), ("k", k), ("m", m), ("ell", ell)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TwoLayerSquareNet: {name} must be a non-negative int; got {value!r}")
        self.d, self.k, self.m, self.ell = d, k, m, ell
        self.trainable_AB = bool(trainable_AB)
        if plan not in PLANS:
            raise ValueError(f"TwoLayerSquareNet: plan must be one of {PLANS}; got {plan!r}")
        self.plan = plan
        # Without dtype or device, a given A or B sets them for the whole
        # module (W and V too), so that its tensors always run together (the
        # wider of two floating dtypes; the first one's device).
        given = [t for t in (A, B) if isinstance(t, torch.Tensor)]
        floating = [t.dtype for t in given if t.is_floating_point()]
        if dtype is None:
            dtype = functools.reduce(torch.promote_types, floating) if floating else torch.get_default_dtype()
        if device is None and given:
            device = given[0].device
        factory = {"device": device, "dtype": dtype}
        self.W = nn.Parameter(torch.empty(k, d, **factory))
        self.V = nn.Parameter(torch.empty(m, k, **factory))
        self._user_A = A is not None
        self._user_B = B is not None
        A_t = self._given(A, "A", (ell,), (1, ell), factory).reshape(1, ell) if A is not None else torch.empty(1, ell, **factory)
        B_t = self._given(B, "B", (ell, m), None, factory) if B is not None else torch.empty(ell, m, **factory)
        if self.trainable_AB:
            self.A = nn.Parameter(A_t)
            self.B = nn.Parameter(B_t)
        else:
            self.register_buffer("A", A_t)
            self.register_buffer("B", B_t)
        self.reset_parameters()

    @staticmethod
    def _given(value, name, shape, alt_shape, factory):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"TwoLayerSquareNet: {name} must be a torch.Tensor; got {type(value).__name__}")
        if tuple(value.shape) != shape and tuple(value.shape) != alt_shape:
            want = str(shape) + (f" or {alt_shape}" if alt_shape else "")
            raise ValueError(f"TwoLayerSquareNet: {name} must have shape {want}; got {tuple(value.shape)}")
        return value.detach().to(**factory).clone()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.W, 0.0, math.sqrt(2.0 / max(self.d, 1)))
        nn.init.normal_(self.V, 0.0, math.sqrt(1.0 / max(self.k, 1)))
        if not self._user_B:
            nn.init.normal_(self.B, 0.0, math.sqrt(1.0 / max(self.m, 1)))
        if not self._user_A:
            nn.init.uniform_(self.A, 0.0, 2.0 / max(self.ell, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return two_layer_square(z, self.W, self.V, self.B, self.A, plan=self.plan)

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}, m={self.m}, ell={self.ell}, trainable_AB={self.trainable_AB}, plan={self.plan!r}"
