"""bertpipe/training/checkpoint.py: when to save, what is kept, and a round trip of everything a restart needs."""

from __future__ import annotations

from pathlib import Path

import torch

from bertpipe.training.checkpoint import (
    Checkpointer,
    History,
    Progress,
    RunState,
    Throughput,
    capture_rng,
    list_checkpoints,
    restore,
    save,
)


def test_the_checkpointer_saves_on_cadence_at_the_end_on_improvement_and_on_stop() -> None:
    checkpointer = Checkpointer(every=10, last_step=25)
    assert [s for s in range(1, 26) if checkpointer.cadence(s)] == [10, 20, 25]
    assert checkpointer.due(3, improved=True, stopping=False) and checkpointer.due(3, improved=False, stopping=True)
    assert not checkpointer.due(3, improved=False, stopping=False)


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_the_newest_and_the_best_are_kept(tmp_path: Path) -> None:
    model, optimizer = tiny()
    for step in (2, 4, 6, 8):
        progress = Progress(RunState(step=step, best_step=4, best_valid_mlm_loss=5.0))
        save(tmp_path, model, optimizer, progress, {"seed": 0}, [capture_rng()], keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004", "step-0000008"]


def test_progress_and_weights_round_trip(tmp_path: Path) -> None:
    model, optimizer = tiny()
    progress = Progress(RunState(step=3, best_step=3, best_valid_mlm_loss=4.5),
                        History(losses=[[6.0, 0.7, 0.1]] * 3, evaluations=[[3, 4.5, 0.2, 0.69, 0.5]]),
                        Throughput(pairs=96, tokens=4000, flops=1e9, seconds=2.5), mlflow_run_id="abc")
    path = save(tmp_path, model, optimizer, progress, {"seed": 0}, [capture_rng()], keep=2)
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    restored, rng = restore(path, fresh, fresh_optimizer)
    assert restored == progress and len(rng) == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(),
                                                 strict=True))
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
