"""torchrun awareness: one code path where a single process is rank 0 of 1. Gloo is enough (no GPU): ranks only
barrier and exchange small objects."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from hubexport.errors import HubexportError

T = TypeVar("T")


def _leave() -> None:
    """Gloo's threads must stop before the interpreter does, or exit can abort with std::terminate; the ranks tear
    gloo down together (a rank that destroys its group while a peer's connection is still closing was seen to abort
    after an 8 GB merge had finished). A peer that is gone is waited for 30 s, no longer."""
    import torch.distributed as tdist

    with contextlib.suppress(RuntimeError):
        tdist.monitored_barrier(timeout=timedelta(seconds=30))
    tdist.destroy_process_group()


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1 and "torch.distributed" not in sys.modules:  # one process: start without torch
            return cls()
        import torch.distributed as tdist

        if world > 1 and not tdist.is_initialized():
            tdist.init_process_group("gloo", timeout=timedelta(hours=2))
            atexit.register(_leave)
        if tdist.is_initialized():
            return cls(tdist.get_rank(), tdist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def sync(self, error: HubexportError | None = None) -> None:
        """A barrier that fails on every rank when any rank failed, so no rank waits forever for a dead peer."""
        errors = [(r, *e) for r, e in enumerate(self.gather(error and (error.message, error.hint))) if e]
        if error is not None:
            raise error
        if errors:
            rank, message, hint = errors[0]
            raise HubexportError(f"rank {rank} failed: {message}", hint=hint)

    def run(self, fn: Callable[[], T], *, main_only: bool = False) -> T | None:
        """`fn` on every rank, or on rank 0 alone; a failure on any rank stops every rank with its message.
        Returns fn's value (None on ranks that did not run it)."""
        value, error = None, None
        if self.is_main or not main_only:
            try:
                value = fn()
            except HubexportError as e:
                error = e
        self.sync(error)
        return value

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value, on every rank."""
        return self.gather(obj)[0]
