"""``--shard auto``: which shard of a batch this process is, from the scheduler that started it.

``SCHEDULERS`` is the table (adding a scheduler edits it): each row names the environment variables it
reads and turns them into a ``Shard``. The first row whose variables are set wins; none set is a usage
error naming every variable looked for. docs/cohorts.md has the table for users, with recipes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from uniseg_cli.errors import UsageError

#: Kubernetes gives an indexed job's pods their index but not the job's completions count.
SHARD_COUNT_VARIABLE = "UNISEG_SHARD_COUNT"


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based), where it came from, and the local rank whose GPU a
    process of several on one node takes (torchrun)."""

    index: int
    count: int
    source: str
    local_rank: int | None = None

    @property
    def spec(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """A file-name part: ``shard-2-of-3`` (1-based, as people count)."""
        return f"shard-{self.index + 1}-of-{self.count}"


@dataclass(frozen=True)
class Scheduler:
    name: str
    variables: tuple[str, ...]
    detect: Callable[[Mapping[str, str], int | None], Shard | None]


def _number(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    if not re.fullmatch(r"\s*-?\d+\s*", value):
        raise UsageError(f"--shard auto: {name}={value!r} is not a whole number")
    return int(value)


def _slurm(env: Mapping[str, str], count: int | None) -> Shard | None:
    """A Slurm job array (``sbatch --array=A-B[:S]``): task IDs A, A+S, … B are shards 0, 1, …"""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = _number(env, "SLURM_ARRAY_TASK_ID")
    low = _number(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else task
    step = _number(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    if "SLURM_ARRAY_TASK_COUNT" in env:
        tasks = _number(env, "SLURM_ARRAY_TASK_COUNT")
    elif "SLURM_ARRAY_TASK_MAX" in env:
        tasks = (_number(env, "SLURM_ARRAY_TASK_MAX") - low) // max(step, 1) + 1
    else:
        raise UsageError("--shard auto: SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT or _MAX")
    index, rest = divmod(task - low, max(step, 1))
    if rest or not 0 <= index < tasks:
        raise UsageError(f"--shard auto: Slurm array task {task} is not one of {tasks} tasks {low}, {low + step}, … "
                         "(arrays given as lists such as --array=1,4,9 cannot be numbered; use A-B or A-B:S)")
    return Shard(index, count or tasks, f"Slurm array task {task} (index {index} of {tasks})")


def _kubernetes(env: Mapping[str, str], count: int | None) -> Shard | None:
    """A Kubernetes indexed Job: ``JOB_COMPLETION_INDEX``, with the job's completions from ``--shard
    auto/N`` or ``UNISEG_SHARD_COUNT`` (Kubernetes does not put it in the pod's environment)."""
    if "JOB_COMPLETION_INDEX" not in env:
        return None
    index = _number(env, "JOB_COMPLETION_INDEX")
    if count is None:
        if SHARD_COUNT_VARIABLE not in env:
            raise UsageError(f"--shard auto: a Kubernetes indexed job (JOB_COMPLETION_INDEX={index}) needs the number "
                             f"of completions: --shard auto/N or {SHARD_COUNT_VARIABLE}=N in the pod's env")
        count = _number(env, SHARD_COUNT_VARIABLE)
    return Shard(index, count, f"Kubernetes indexed job, completion index {index} of {count}")


def _torchrun(env: Mapping[str, str], count: int | None) -> Shard | None:
    """torchrun (or any launcher of ``RANK``/``WORLD_SIZE``): rank R of W, on GPU ``LOCAL_RANK``."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank, world = _number(env, "RANK"), _number(env, "WORLD_SIZE")
    local = _number(env, "LOCAL_RANK") if "LOCAL_RANK" in env else None
    return Shard(rank, count or world, f"torchrun rank {rank} of {world}", local)


SCHEDULERS: tuple[Scheduler, ...] = (
    Scheduler("Slurm job array", ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
                                  "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MAX"), _slurm),
    Scheduler("Kubernetes indexed job", ("JOB_COMPLETION_INDEX", SHARD_COUNT_VARIABLE), _kubernetes),
    Scheduler("torchrun", ("RANK", "WORLD_SIZE", "LOCAL_RANK"), _torchrun),
)


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> Shard | None:
    """``I/N``, ``auto`` or ``auto/N`` (N overrides the scheduler's count) → the shard, or None."""
    if text is None:
        return None
    env = os.environ if env is None else env
    match = re.fullmatch(r"\s*auto\s*(?:/\s*(\d+)\s*)?", text)
    if match:
        count = int(match.group(1)) if match.group(1) else None
        for scheduler in SCHEDULERS:
            shard = scheduler.detect(env, count)
            if shard is not None:
                return _checked(shard, text)
        looked = ", ".join(dict.fromkeys(v for s in SCHEDULERS for v in s.variables[:2]))
        raise UsageError(f"--shard {text}: no scheduler found (looked for {looked}); give --shard I/N")
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise UsageError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4 (or auto)")
    return Shard(int(match.group(1)), int(match.group(2)), "--shard")


def _checked(shard: Shard, text: str) -> Shard:
    if shard.count < 1 or not 0 <= shard.index < shard.count:
        raise UsageError(f"--shard {text}: shard {shard.index} of {shard.count} ({shard.source}): expected 0 <= I < N")
    return shard
