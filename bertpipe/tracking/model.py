"""The export as an MLflow 3 model of the pretrain run: a LoggedModel with MLflow's transformers flavour.

The Hugging Face folder is logged as a fill-mask pipeline (task `fill-mask`), linked to the run and
the exported checkpoint's step, so it is in the run's and the experiment's Models view and loads by
`runs:/RUN/model` and `models:/m-...` with `mlflow.pyfunc.load_model` or `mlflow models serve`. Its pyfunc
is `bertpipe.tracking.served`, shipped inside the model, which refuses what `bertpipe fill-mask` refuses
(no mask token, more tokens than the model has positions) in the same words instead of a traceback.
The pipeline is built from the folder once (its weights loaded once; the NSP head, which fill-mask
does not use, is left out), with explicit pip requirements (nothing inferred by loading the model
again) and a model card of our own (MLflow would look one up on the Hugging Face Hub).

MLflow's path form (`log_model("folder", task=...)`) would skip loading the weights, but MLflow 3.17
fails on it with transformers 5 (it reads `check_task(task)[1]["impl"].__name__`, a string there).
`mlflow.transformers.log_model` is `Model.log(flavor=mlflow.transformers)`; here `Model.log` gets `served`,
which writes the same flavour with its own pyfunc loader.

Without transformers, or when MLflow refuses the flavour, the folder is logged as plain files under
the run's `model/` (one warning line says so), which `from_pretrained` loads after a download.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bertpipe.errors import first_line
from bertpipe.tracking.delivery import Delivery, Record, Repair, dict_record, metrics_record, retried
from bertpipe.tracking.store import TrackingError, client, credentials_refused, fail_fast_http, store_lock, tracking_uri
from bertpipe.tracking.ui import announce_model, announce_run

log = logging.getLogger(__name__)
MODEL_NAME = "model"  # runs:/RUN/model
REQUIREMENTS = ("mlflow", "transformers", "torch", "tokenizers", "safetensors")  # what serving the flavour imports


@dataclass
class Logged:
    """Where the export went: a `models:/m-...` URI and its LoggedModel id, or the run's `model/` folder."""

    uri: str | None = None
    model_id: str | None = None


def log_export(run_id: str, model_dir: Path, metrics: dict[str, Any], register_as: str = "") -> str | None:
    """Complete pretrain's MLflow run with the export: metrics under `export/...` at the exported step and as
    `export.json`, the model, and with `register_as` a new version of that registered model linked to it.

    Returns the model's URI (`models:/m-...`, or the artifact URI of `model/` for plain files), or None
    when MLflow failed (one warning line each time); `model_dir` holds the model either way.
    """
    uri = tracking_uri()
    found = pretrain_run(uri, run_id, f"the model is in {model_dir}")
    if found is None:
        return None
    mlflow_client, run = found
    logged = Logged()
    if run is not None:
        step = int(metrics["step"])
        delivery = Delivery(uri)
        scalars = {f"export/{k}": v for k, v in metrics.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        delivery.submit(metrics_record(mlflow_client, run_id, scalars, step))  # before the model: they link to it
        delivery.submit(dict_record(mlflow_client, run_id, metrics, "export.json"))
        delivery.submit(_model_record(mlflow_client, uri, run, model_dir, step, logged))
        delivery.close()
    if logged.uri is None:
        log.warning("MLflow run %s lacks the exported model, which is in %s; once MLflow accepts it, "
                    "`dvc repro -s -f export` (this stage alone) logs it", run_id, model_dir)
        return None
    announce_run(uri, run.info.experiment_id, run_id)
    if logged.model_id:
        announce_model(uri, run.info.experiment_id, logged.model_id)
    if register_as:
        _register(mlflow_client, uri, register_as, logged, run_id)
    return logged.uri


def pretrain_run(uri: str, run_id: str, kept: str) -> tuple[Any, Any] | None:
    """The client and the pretrain run (None when the store keeps failing); None when the store has no such
    run or refuses the credentials, which retrying cannot mend: one warning line saying what can, and where the
    output is `kept`."""
    try:
        mlflow_client = client(uri)
    except TrackingError as err:
        log.warning("%s", err)
        return None, None
    try:
        return mlflow_client, retried(lambda: _get_run(mlflow_client, uri, run_id))
    except _RunMissing as missing:
        log.warning("MLflow run %s is not in %s (%s): pretrain logged to another store, or the run was deleted; "
                    "%s, not in MLflow. Point MLFLOW_TRACKING_URI at pretrain's store, or rerun pretrain on this one "
                    "(dvc repro -s -f pretrain)", run_id, uri, missing, kept)
        return None
    except _CredentialsRefused as refused:
        log.warning("MLflow refused reading run %s (%s): %s; %s, not in MLflow", run_id, *refused.args, kept)
        return None


class _RunMissing(Exception):
    """The store answers, and has no such run: retrying cannot help."""


class _CredentialsRefused(Exception):
    """The store answers 401 or 403: retrying cannot help. Its args: the answer and what mends it."""


def _get_run(mlflow_client: Any, uri: str, run_id: str) -> Any:
    try:
        with store_lock(uri), fail_fast_http():
            return mlflow_client.get_run(run_id)
    except Exception as err:  # MLflow raises many types
        if getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise _RunMissing(first_line(err)) from None
        if (mend := credentials_refused(err)) is not None:
            raise _CredentialsRefused(first_line(err), mend) from None
        log.warning("MLflow: reading run %s failed (%s)", run_id, first_line(err))
        return None


def _model_record(mlflow_client: Any, uri: str, run: Any, model_dir: Path, step: int, logged: Logged) -> Record:
    """The flavour's record, which falls back to plain files when MLflow refuses it; plain files when
    transformers cannot build the pipeline."""
    plain = _plain_record(mlflow_client, run, model_dir, logged)
    pipeline = _fill_mask_pipeline(model_dir)
    if pipeline is None:
        return plain

    def send() -> None:
        import mlflow
        from mlflow.models import Model

        from bertpipe.tracking import served

        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment_id=run.info.experiment_id)  # LoggedModels go to the active experiment
        card = _card(run, step, pipeline.tokenizer.mask_token)
        info = Model.log(artifact_path=None, flavor=served, name=MODEL_NAME, run_id=run.info.run_id, step=step,
                         transformers_model=pipeline, pip_requirements=_requirements(), model_card=card)
        logged.uri, logged.model_id = info.model_uri, info.model_id

    return Record("model (transformers flavour)", send, essential=False,
                  repair=lambda err: Repair([plain], note=f"logged as plain files under {MODEL_NAME}/ instead"))


def _plain_record(mlflow_client: Any, run: Any, model_dir: Path, logged: Logged) -> Record:
    def send() -> None:
        mlflow_client.log_artifacts(run.info.run_id, str(model_dir), MODEL_NAME)
        logged.uri = f"{run.info.artifact_uri}/{MODEL_NAME}"

    return Record(f"artifacts {MODEL_NAME}/", send, essential=False)


def _fill_mask_pipeline(model_dir: Path) -> Any | None:
    """transformers' fill-mask pipeline over the folder, or None (one warning line) where it cannot be built."""
    try:
        import transformers
    except ImportError:
        log.warning("MLflow: transformers is not installed, so the model is logged as plain files under %s/, "
                    "not as an MLflow model (pip install -e .)", MODEL_NAME)
        return None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # BertForMaskedLM reports the NSP head's keys as unused
    folder = str(model_dir.resolve())  # the model's name to MLflow: never a Hub repo id ("models/bert" is one)
    try:
        return transformers.pipeline("fill-mask", model=folder, tokenizer=folder)
    except Exception as err:  # an installed transformers that cannot read the folder
        log.warning("MLflow: transformers %s cannot build a fill-mask pipeline from %s (%s), so the model is "
                    "logged as plain files under %s/", transformers.__version__, model_dir, first_line(err),
                    MODEL_NAME)
        return None
    finally:
        transformers.logging.set_verbosity(verbosity)


def _requirements() -> list[str]:
    """Pinned to what is installed, local labels dropped (`torch==2.13.0`, not `2.13.0+cpu`)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


def _card(run: Any, step: int, mask_token: str) -> Any:
    """The model card MLflow stores beside the model (instead of asking the Hub for one)."""
    from huggingface_hub import ModelCard

    return ModelCard(f"---\nlibrary_name: transformers\npipeline_tag: fill-mask\ntags: [bert, bertpipe]\n---\n"
                     f"# BERT pretrained by bertpipe\n\nMLflow run `{run.info.run_id}` ({run.info.run_name}), "
                     f"checkpoint of step {step}, exported by bertpipe's `export` stage. The fill-mask head and "
                     f"the tokenizer of the run's own vocabulary (mask token `{mask_token}`); the NSP head is in the "
                     "DVC experiment's `models/bert`.\n")


def _register(mlflow_client: Any, uri: str, name: str, logged: Logged, run_id: str) -> None:
    """A new version of registered model `name` (created if new): of the LoggedModel by `mlflow.register_model`,
    which also lists the version on the model's page; of plain files from their artifact URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    versions: list[str] = []

    def send() -> None:
        if logged.model_id:
            versions.append(mlflow.register_model(logged.uri, name, await_registration_for=0).version)
            return
        try:
            mlflow_client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        versions.append(mlflow_client.create_model_version(name, logged.uri, run_id=run_id).version)

    delivery = Delivery(uri)
    delivery.submit(Record(f"registration as {name!r}", send, essential=False))
    delivery.close()
    if versions:
        log.info("registered %s as version %s of MLflow model %r", logged.uri, versions[0], name)
