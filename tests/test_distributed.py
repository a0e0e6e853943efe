"""DistributedDataParallel over gloo, two processes on loopback: the averaged
gradients and the trained weights equal a single-process run on the whole batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_common import make_model_and_data, train


def worker(rank, world, port, out_path):
    # gloo would otherwise pick the interface its hostname resolves to; keep
    # every connection on loopback.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    # Two workers on a 2-core machine: one thread each, so that neither
    # starves the other's gloo threads (results do not depend on it: tested
    # in test_determinism).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net, z, target = make_model_and_data()
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        grads, params = train(ddp, z, target, rank, world)
        if rank == 0:
            torch.save({"grads": grads, "params": params}, out_path)
        # Both ranks done before either tears down (gloo aborts a process whose
        # peer vanished mid-teardown).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_two_processes_match_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    attempts = 3
    for attempt in range(attempts):
        try:
            mp.start_processes(worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
            break
        except mp.ProcessExitedException as exc:
            # A worker killed by a signal inside gloo's C++ runtime (seen about
            # once in 20 runs with torch 2.14, more often on a loaded machine:
            # "terminate called without an active exception") is
            # infrastructure, not a wrong result: retried.
            if attempt == attempts - 1 or getattr(exc, "signal_name", None) is None:
                raise
    result = torch.load(out)
    net, z, target = make_model_and_data()
    grads, params = train(net, z, target)
    for step_ddp, step_single in zip(result["grads"], grads):
        for a, b in zip(step_ddp, step_single):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(result["params"], params):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
