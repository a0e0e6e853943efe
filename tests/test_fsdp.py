"""FSDP2 (torch.distributed.fsdp.fully_shard) over gloo, two processes on
loopback: the Module's parameters sharded across ranks, the fused op run on
the gathered ones, and the reduce-scattered gradients and trained weights
equal a single-process run on the whole batch."""

import pytest
import torch
import torch.distributed as dist

from distributed_common import join_gloo, make_model_and_data, run_two_workers, train


def worker(rank, world, port, out_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    join_gloo(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = {}
        # Both layouts in one pair of processes: starting them costs more than the runs.
        for trainable_AB in (False, True):
            net, z, target = make_model_and_data(trainable_AB)
            fully_shard(net, mesh=mesh)
            # Each rank holds only its shard: the test would pass trivially otherwise.
            assert sum(p.to_local().numel() for p in net.parameters()) < sum(p.numel() for p in net.parameters())
            results[trainable_AB] = train(net, z, target, rank, world)
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def has_fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.skipif(not has_fully_shard(), reason="needs torch.distributed.fsdp.fully_shard (FSDP2)")
def test_fsdp2_two_processes_match_single_process(tmp_path):
    out = str(tmp_path / "fsdp.pt")
    run_two_workers(worker, out)
    results = torch.load(out)
    for trainable_AB, (fsdp_grads, fsdp_params) in results.items():
        net, z, target = make_model_and_data(trainable_AB)
        grads, params = train(net, z, target)
        assert len(params) == len(fsdp_params) == (4 if trainable_AB else 2)
        for step_fsdp, step_single in zip(fsdp_grads, grads):
            for a, b in zip(step_fsdp, step_single):
                assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), f"trainable_AB={trainable_AB}"
        for a, b in zip(fsdp_params, params):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), f"trainable_AB={trainable_AB}"
