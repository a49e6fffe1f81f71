"""Parallelism applied from outside the model: mesh and sizes, tensor, pipeline, data and
expert parallelism, one file each. The model itself never imports torch.distributed."""
