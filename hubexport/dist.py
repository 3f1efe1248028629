"""torchrun awareness: one code path where a single process is rank 0 of 1. Gloo is enough (no GPU): ranks only
barrier and exchange small objects."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as tdist

from hubexport.errors import HubexportError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not tdist.is_initialized():
            tdist.init_process_group("gloo", timeout=timedelta(hours=2))
            # Gloo's threads must stop before the interpreter does, or exit can abort with std::terminate.
            atexit.register(tdist.destroy_process_group)
        if tdist.is_initialized():
            return cls(tdist.get_rank(), tdist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def sync(self, error: HubexportError | None = None) -> None:
        """A barrier that fails on every rank when any rank failed, so no rank waits forever for a dead peer."""
        errors = [e for e in self.gather(error and (type(error).__name__, error.message, error.hint)) if e]
        if error is not None:
            raise error
        if errors:
            _, message, hint = errors[0]
            raise HubexportError(f"another rank failed: {message}", hint=hint)
