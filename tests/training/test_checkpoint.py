"""bertpipe/training/checkpoint.py (and the loop's Checkpointer): when to save, what is kept, and a round trip of
everything a restart needs."""

from __future__ import annotations

from pathlib import Path

import torch

from bertpipe.training.checkpoint import (
    History,
    RunRecord,
    RunState,
    Throughput,
    capture_rng,
    list_checkpoints,
    restore,
    save,
)
from bertpipe.training.loop import Checkpointer


def test_the_checkpointer_is_due_on_cadence_and_at_the_last_step() -> None:
    """Forced saves (a best evaluation, a stop): tests/training/test_train.py's best-checkpoint and SIGTERM tests."""
    checkpointer = Checkpointer(work=None, every=10, keep=1)
    assert [s for s in range(1, 26) if checkpointer.due(s, last_step=s == 25)] == [10, 20, 25]


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_the_newest_and_the_best_are_kept(tmp_path: Path) -> None:
    model, optimizer = tiny()
    for step in (2, 4, 6, 8):
        record = RunRecord(RunState(step=step, best_step=4, best_valid_mlm_loss=5.0))
        save(tmp_path, model, optimizer, record, {"seed": 0}, [capture_rng()], keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004", "step-0000008"]


def test_record_and_weights_round_trip(tmp_path: Path) -> None:
    model, optimizer = tiny()
    evaluation = {"step": 3, "valid_mlm_loss": 4.5, "valid_mlm_acc": 0.2, "valid_nsp_loss": 0.69, "valid_nsp_acc": 0.5}
    record = RunRecord(RunState(step=3, best_step=3, best_valid_mlm_loss=4.5),
                       History(losses=[{"mlm_loss": 6.0, "nsp_loss": 0.7, "lr": 0.1}] * 3, evaluations=[evaluation]),
                       Throughput(pairs=96, tokens=4000, flops=1e9, seconds=2.5), mlflow_run_id="abc")
    path = save(tmp_path, model, optimizer, record, {"seed": 0}, [capture_rng()], keep=2)
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    restored, rng = restore(path, fresh, fresh_optimizer)
    assert restored == record and len(rng) == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(),
                                                 strict=True))
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_positional_history_rows_of_older_checkpoints_are_named() -> None:
    saved = {"losses": [[6.0, 0.7, 0.1]], "evaluations": [[3, 4.5, 0.2, 0.69, 0.5]], "skipped_steps": 0}
    history = History.from_json(saved)
    assert history.losses == [{"mlm_loss": 6.0, "nsp_loss": 0.7, "lr": 0.1}]
    assert history.evaluations[0]["step"] == 3 and history.evaluations[0]["valid_nsp_acc"] == 0.5
