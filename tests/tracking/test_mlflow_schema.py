"""The columns bertpipe writes in MLflow's tables itself (`bertpipe.tracking.store.relocate`), in the installed MLflow.

MLflow's API cannot move artifact locations, so `relocate` runs SQL on five columns of MLflow's
schema. An MLflow upgrade that migrates them would break it silently; these tests fail instead, and a
store at a revision bertpipe does not know is refused with one line, never written.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy

from bertpipe.tracking import TrackingError, client, open_experiment
from bertpipe.tracking.store import ARTIFACT_COLUMNS, SCHEMA_MLFLOW, SCHEMA_REVISION


def test_the_columns_relocate_writes_are_the_installed_mlflows(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client(uri)  # a fresh store, created and migrated by the installed MLflow
    engine = sqlalchemy.create_engine(uri)
    with engine.connect() as connection:
        revision = connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar()
    assert revision == SCHEMA_REVISION, (
        f"MLflow's schema moved from {SCHEMA_REVISION} (MLflow {SCHEMA_MLFLOW}) to {revision}: read its migrations "
        "since then for the columns in bertpipe.tracking.store.ARTIFACT_COLUMNS, fix relocate's UPDATEs if they "
        "changed, then set SCHEMA_REVISION and SCHEMA_MLFLOW")
    inspector = sqlalchemy.inspect(engine)
    columns = {table: {c["name"]: c["type"] for c in inspector.get_columns(table)}
               for table in {table for table, _ in ARTIFACT_COLUMNS}}
    for table, column in ARTIFACT_COLUMNS:
        assert isinstance(columns[table].get(column), sqlalchemy.String), (table, column, columns[table])
    assert isinstance(columns["experiments"]["experiment_id"], sqlalchemy.Integer)


def test_a_store_of_another_schema_is_refused_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow_client = client(uri)
    scratch = (tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123" / "mlruns").as_uri()
    experiment_id = mlflow_client.create_experiment("bertpipe", artifact_location=scratch)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # as a later MLflow's migration would leave it
        db.execute("UPDATE alembic_version SET version_num = 'f00dfeedbeef'")
    with pytest.raises(TrackingError) as caught:
        open_experiment(mlflow_client, uri, "bertpipe")
    message = str(caught.value)
    assert f"MLflow {SCHEMA_MLFLOW}'s schema (revision {SCHEMA_REVISION}), not f00dfeedbeef" in message
    assert "DVC's scratch folder" in message and "set mlflow.experiment to a new name" in message
    assert "\n" not in message
    assert mlflow_client.get_experiment(experiment_id).artifact_location == scratch
