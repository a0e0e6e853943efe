"""What the DDP and FSDP2 tests share: the model, the data and the training
loop each rank (or the single-process reference) runs."""
import torch

import torchext

STEPS, N, D, K, M, ELL = 3, 64, 6, 5, 4, 3


def make_model_and_data(trainable_AB=False):
    torch.manual_seed(0)
    net = torchext.TwoLayerSquareNet(D, K, M, ELL, trainable_AB=trainable_AB, dtype=torch.float64)
    z = torch.randn(STEPS, N, D, dtype=torch.float64)
    target = torch.randn(STEPS, N, dtype=torch.float64)
    return net, z, target


def full(t):
    """A sharded DTensor gathered into a plain tensor (plain tensors as they are)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(net, z, target, rank=0, world=1):
    """SGD over STEPS steps on this rank's share of each batch: the gradients
    of every step and the final weights, as plain tensors."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    grads = []
    share = N // world
    for step in range(STEPS):
        rows = slice(rank * share, (rank + 1) * share)
        loss = torch.mean((net(z[step, rows]) - target[step, rows]) ** 2)
        opt.zero_grad()
        loss.backward()
        grads.append([full(p.grad) for p in net.parameters()])
        opt.step()
    return grads, [full(p) for p in net.parameters()]
