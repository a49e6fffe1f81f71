"""Parallelism applied from outside the model, one file each (the model itself never imports
torch.distributed):

    mesh.py          ParallelDims: sizes, layout checks, the device mesh
    shards.py        one ShardRecord per parameter name: how this rank's copy was cut
    launch.py        process-group start-up from torchrun's environment
    plan.py          the sharding plan: each parameter's tp / ep split, as data
    parallelize.py   the one place parallelism is applied, in a fixed order
    tensor.py        Megatron's f / g on the plan's regions
    expert.py        the experts' all-to-all
    pipeline.py      stages and schedules
    grads.py         gradient reduction over data ranks, the global grad norm, reduced metrics
    fsdp.py          FSDP2 (fully_shard) over the data ranks: parallel.dp_shard=fsdp
    sharded_model.py ShardedModel: this rank's parts, a training step and eval on them
    rng.py           every rank's random generators in a checkpoint
    activation_checkpoint.py   full or selective recomputation
"""
