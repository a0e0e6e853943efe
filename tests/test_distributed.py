"""DistributedDataParallel over gloo, two processes on loopback: the averaged
gradients and the trained weights equal a single-process run on the whole batch."""

import pytest
import torch
import torch.distributed as dist

from distributed_common import join_gloo, make_model_and_data, run_two_workers, train


def worker(rank, world, port, out_path):
    join_gloo(rank, world, port)
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


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_two_processes_match_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    run_two_workers(worker, out)
    result = torch.load(out)
    net, z, target = make_model_and_data()
    grads, params = train(net, z, target)
    for step_ddp, step_single in zip(result["grads"], grads):
        for a, b in zip(step_ddp, step_single):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(result["params"], params):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
