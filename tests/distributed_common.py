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


def join_gloo(rank, world, port):
    """This worker in a gloo group on loopback, one thread (two workers on a
    2-core machine: neither starves the other's gloo threads; results do not
    depend on the thread count, as test_determinism shows)."""
    import os

    import torch.distributed as dist

    # gloo would otherwise pick the interface its hostname resolves to.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def run_two_workers(worker, out_path, attempts=3):
    """worker(rank, 2, port, out_path) in two spawned processes. A worker
    killed by a signal inside gloo's C++ runtime (seen about once in 20 runs
    with torch 2.14, more often on a loaded machine: "terminate called without
    an active exception") is infrastructure, not a wrong result: retried."""
    import socket

    import torch.multiprocessing as mp

    for attempt in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.start_processes(worker, args=(2, port, out_path), nprocs=2, join=True, start_method="spawn")
            return
        except mp.ProcessExitedException as exc:
            if attempt == attempts - 1 or getattr(exc, "signal_name", None) is None:
                raise
