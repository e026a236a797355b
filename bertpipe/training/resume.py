"""Which checkpoint a pretrain run continues from, and what it says when it cannot.

A run continues from the newest checkpoint of its own trajectory (`bertpipe.training.workdir`: the work folder,
or the stage's output folder as DVC restored it); one made under other settings (model shape, data,
seed, optimizer, ...) is never loaded: the run names the first settings that differ and starts
fresh, and the other checkpoints go only once this run has one of its own (`WorkFolder.publish`),
so a run that fails early destroys nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from bertpipe.training import checkpoint
from bertpipe.training.run import Run

log = logging.getLogger(__name__)


def resume(run: Run) -> None:
    """Restore weights, optimizer, progress and RNG from the newest checkpoint of the run's trajectory."""
    work = run.work
    if run.world.is_main:
        for folder in (work.folder, work.out):
            checkpoint.remove_partial_writes(folder)
        work.adopt()
    if run.world.distributed:
        torch.distributed.barrier()  # rank 0 has adopted what there is before any rank looks
    found = checkpoint.list_checkpoints(work.folder)
    if not found:
        _report_other_settings(run)
        return
    latest = found[-1]
    run.progress, rng_states = checkpoint.restore(latest, run.model, run.optimizer)
    run.compute.push_weights()
    run.last_checkpoint = work.out / latest.name
    if run.world.is_main:
        work.publish()
    if len(rng_states) == run.world.size:
        checkpoint.apply_rng(rng_states[run.world.rank])
    else:
        log.warning("%s holds RNG states of %d processes, this run has %d: dropout streams start afresh",
                    latest, len(rng_states), run.world.size)
    log.info("resuming from %s (step %d of %d), kept in %s", run.last_checkpoint, run.progress.state.step,
             run.params.train.steps, work.folder)


def _report_other_settings(run: Run) -> None:
    """The output folder's newest checkpoint, when it is of another trajectory: what differs."""
    found = checkpoint.list_checkpoints(run.work.out)
    if found and run.world.is_main:
        saved = checkpoint.read_state(found[-1])
        log.warning("%s was made with other settings or data (%s); starting fresh", found[-1],
                    spec_difference(saved.get("spec", {}), run.spec))


def spec_difference(old: dict[str, Any], new: dict[str, Any], shown: int = 6) -> str:
    """The first `shown` settings that differ, as `key: old -> new`, and how many more there are."""
    changes = _changes(old, new)
    more = f"; and {len(changes) - shown} more" if len(changes) > shown else ""
    return "; ".join(changes[:shown]) + more


def _changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes
