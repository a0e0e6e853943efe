"""A small forward+backward on the GPU through every CUDA kernel of torchext,
for compute-sanitizer (memcheck, racecheck) in scripts/gpu_check.sh: the fused
quadratic forward (saving and not) and backward (dz, dW, Gram and the
partition sums), the direct plan's inference kernel, and the ATen path."""
import torch

import torchext


def main():
    torch.manual_seed(0)
    dev = "cuda"
    # Odd sizes: partial tiles in every dimension; N over 1024 rows so the
    # backward has more than one partition.
    for (N, d, k, m, ell) in [(1100, 70, 65, 9, 5), (37, 16, 16, 16, 16)]:
        z = torch.randn(N, d, device=dev, requires_grad=True)
        W = torch.randn(k, d, device=dev, requires_grad=True)
        V = torch.randn(m, k, device=dev, requires_grad=True)
        B = torch.randn(ell, m, device=dev, requires_grad=True)
        A = torch.randn(1, ell, device=dev, requires_grad=True)
        for plan in ("quadratic", "folded", "direct"):
            torchext.two_layer_square(z, W, V, B, A, plan=plan).sum().backward()
            with torch.no_grad():
                torchext.two_layer_square(z, W, V, B, A, plan=plan)
    torch.cuda.synchronize()
    print("sanitizer case done")


if __name__ == "__main__":
    main()
