"""Data-parallel plumbing from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a no-op
for a single process, so the training loop reads the same either way."""
import os

import torch.distributed as dist

from .device import is_cuda


def env_world():
    """(rank, local_rank, world_size) from torchrun's variables, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


def init(device):
    """Join torchrun's process group (nccl for CUDA, gloo for the CPU)."""
    if env_world()[2] > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if is_cuda(device) else "gloo")


def active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


def all_reduce_sum(tensor, op=dist.ReduceOp.SUM):
    """Reduce `tensor` over ranks in place (the identity for one process)."""
    if active():
        dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_max(tensor):
    return all_reduce_sum(tensor, dist.ReduceOp.MAX)


def broadcast_object(obj, src=0):
    """Rank `src`'s Python object on every rank."""
    box = [obj]
    if active():
        dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj):
    """A list with every rank's object, on every rank."""
    out = [obj] * world_size()
    if active():
        dist.all_gather_object(out, obj)
    return out


def barrier():
    if active():
        dist.barrier()


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
