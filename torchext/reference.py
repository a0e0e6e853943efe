"""The eager composition of torch ops: the test oracle for the fused operator.

    x = z Wᵀ,  r = relu(x),  y = B V r,  f = Σ_i a_i y_i²   (a = A as a vector)

Batched over z's leading dimensions; autograd through these ops gives the
reference gradients.
"""
import torch


def two_layer_square(z: torch.Tensor, W: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    r = torch.relu(z @ W.T)
    y = (r @ V.T) @ B.T
    return (y * y) @ A.reshape(-1)
