"""MLflow as a mirror of the DVC metrics: one run per `pretrain`, completed by `export` with the model.

DVC's metrics and plots files stay the source of truth; this logger (in the spirit of
torchtitan's `BaseLogger.log(metrics, step)`) copies them into MLflow for comparison in its UI.

- `store`: which store, created and migrated once under a file lock, the experiment in it, artifact
  locations mended when they went astray (the one place with SQL on MLflow's tables, pinned by a test).
- `delivery`: every call is a record delivered in order; transient failures are retried, a refused
  record is repaired or dropped alone (each kind of record says how), refused credentials are never retried.
- `run`: the pretrain run (`MlflowTracker`), `NullTracker`, which does nothing, and runs of dead
  processes ended KILLED.
- `model`: the export as a LoggedModel with MLflow's transformers flavour (`log_export`).
- `served`: that model's pyfunc, shipped inside it: it refuses what `bertpipe fill-mask` refuses, in its words.
- `downstream`: the downstream scores on the pretrain run, a child run per fine-tuning.
- `ui`: links that open the UI on the training runs; `bertpipe ui`.

Nothing here imports MLflow at import time: ranks other than 0 and `mlflow.enabled: false` never load it.
"""

from bertpipe.tracking.model import log_export
from bertpipe.tracking.run import MlflowTracker, NullTracker, Tracker, dvc_tags, git_commit
from bertpipe.tracking.store import TrackingError, client, open_experiment, tracking_uri

__all__ = ["MlflowTracker", "NullTracker", "Tracker", "TrackingError", "client", "dvc_tags", "git_commit",
           "log_export", "open_experiment", "tracking_uri"]
