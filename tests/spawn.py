"""Start N gloo worker processes on this machine, for the tests that compare a distributed run
with the single-process one.

A worker that finished its checks leaves with ``os._exit(0)`` after destroying its process
group: gloo's worker threads can still hold work objects at interpreter teardown, and a worker
then aborted at exit ("terminate called without an active exception", SIGABRT) now and then on
the 2-core CI machine although every check had passed. A worker whose check fails raises as
usual, so ``mp.spawn`` reports its traceback.
"""
import gc
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    fn(rank, world, *args)  # a failed check raises here; mp.spawn reports it
    dist.barrier()
    gc.collect()  # DDP reducers and autograd graphs in reference cycles, while the group exists
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes (one thread each)."""
    mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)


def split(tensor, sizes, rank):
    """Rank ``rank``'s rows of a global batch whose ranks hold ``sizes`` rows each, in order."""
    start = sum(sizes[:rank])
    return tensor[start:start + sizes[rank]]


def mean_over_ranks(value):
    """The mean over the ranks of a scalar (a collective)."""
    value = value.detach().clone().reshape(1)
    dist.all_reduce(value)
    return value[0] / dist.get_world_size()
