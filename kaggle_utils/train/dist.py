"""Ranks of a ``torchrun`` launch: :class:`_Dist` (rank, world size, device, process group) and the
few collective operations the training loop needs (broadcast a number or flag, mean of numbers, barrier)."""

from __future__ import annotations

import datetime
import os

import torch

from ..device import resolve_device

__all__: list[str] = []


class _Dist:
    """Rank/world of a ``torchrun`` launch (or a single process)."""

    def __init__(self, device: str | torch.device | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")) if self.world > 1 else None)
        self.owns_group = False
        if self.world > 1:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                # rank 0 validates whole volumes while the others wait: allow long waits
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                        timeout=datetime.timedelta(hours=3))
                self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(t, 0)
        return float(t.item())

    def broadcast_flag(self, value: int) -> int:
        """Rank 0's integer ``value`` on every rank."""
        return int(round(self.broadcast(float(value))))

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
