"""
BAGEL's guidance branches on several processes (a [`BagelPipeline`] under `torchrun`): which process runs which
branch, and the exchange of the branches' velocities at each denoising step.

Dual classifier-free guidance runs up to three branches per step (`"cond"`: the full context, `"text"`: without the
text, `"image"`: without the images). With [`GuidanceParallel`] each process of a `torch.distributed` group runs its
share of them against the contexts only it prefills, and after each step's forwards every process holds every active
branch's velocity, so that all of them combine the same guidance and keep the same latents.
"""

import torch
import torch.distributed as dist
from diffusers.utils import logging


logger = logging.get_logger(__name__)

__all__ = ["GuidanceParallel", "assign_branches"]

# torch 2.13 renamed `all_gather_into_tensor` (deprecated there) to `all_gather_single`; the project supports torch 2.6.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def assign_branches(branches: list[str], world_size: int) -> dict[str, int]:
    """
    The rank that runs each of a call's guidance `branches` (in `("cond", "text", "image")` order) on `world_size`
    processes: one branch per rank while there are ranks enough (ranks left over have none), otherwise "cond" alone on
    rank 0 and the later branches shared by the other ranks, the last rank taking those left over. The full-context
    branch attends the most keys (an edit's "cond" attends every cached key, its "image" branch only the instruction's),
    so it is the one left alone: an edit on 2 processes runs "cond" on rank 0 and "text" + "image" on rank 1 (1.55x
    per step at 7B 1024x1024 by `examples/benchmark.py --communication`, against 1.40x with "cond" + "text" together).
    """
    if world_size == 1 or len(branches) <= world_size:
        return {branch: (index if world_size > 1 else 0) for index, branch in enumerate(branches)}
    return {branch: min(index, world_size - 1) for index, branch in enumerate(branches)}


class GuidanceParallel:
    """
    The processes of `process_group` (the default group when None) sharing the guidance branches of a call; see
    [`BagelPipeline.enable_guidance_parallel`]. `torch.distributed` must be initialised.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "Guidance parallelism needs an initialised torch.distributed process group: run under `torchrun "
                "--nproc_per_node N` and call `torch.distributed.init_process_group()` (gloo on CPU, nccl on CUDA) "
                "before `enable_guidance_parallel()`."
            )
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)

    def check_initialized(self) -> None:
        """Refuses a call after the process group was destroyed."""
        if not dist.is_initialized():
            raise ValueError(
                "Guidance parallelism is enabled but the torch.distributed process group was destroyed; initialise it "
                "again, or call `pipe.disable_guidance_parallel()`."
            )

    def broadcast_from_first(self, tensor: torch.Tensor) -> None:
        """Overwrites `tensor` with rank 0's, in place."""
        dist.broadcast(tensor, group=self.process_group, group_src=0)

    def owners(self, branches: list[str]) -> dict[str, int]:
        """The rank of each of `branches` (see [`assign_branches`]); the ranks with no branch are logged once."""
        owners = assign_branches(branches, self.world_size)
        if self.rank not in owners.values():
            logger.info(
                f"Rank {self.rank} of {self.world_size} runs no guidance branch of this call ({', '.join(branches)}); "
                "it receives the velocities."
            )
        return owners

    def exchange(self, velocities: dict[str, torch.Tensor], active: list[str], owners: dict[str, int],
                 like: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
        """
        Every active branch's velocity on every rank, from the ones this rank computed (`velocities`): one broadcast
        from the rank that holds every active branch (outside `cfg_interval`, only "cond" runs), otherwise one
        `all_gather` of each rank's branches, stacked (a rank with fewer branches than another pads its stack).
        `like`: a tensor of the velocities' shape, dtype and device.
        """
        holders = sorted({owners[branch] for branch in active})
        if len(holders) == 1:
            if self.rank == holders[0]:
                stacked = torch.stack([velocities[branch] for branch in active])
            else:
                stacked = like.new_empty((len(active), *like.shape))
            dist.broadcast(stacked, group=self.process_group, group_src=holders[0])
            return dict(zip(active, stacked.unbind(0)))
        per_rank = [[branch for branch in active if owners[branch] == rank] for rank in range(self.world_size)]
        slots = max(len(branches) for branches in per_rank)
        mine = like.new_zeros((slots, *like.shape))
        for slot, branch in enumerate(per_rank[self.rank]):
            mine[slot] = velocities[branch]
        gathered = like.new_empty((self.world_size * slots, *like.shape))
        _all_gather_single(gathered, mine, group=self.process_group)
        return {branch: gathered[rank * slots + slot] for rank, branches in enumerate(per_rank)
                for slot, branch in enumerate(branches)}  # fmt: skip
