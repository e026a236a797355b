"""The `init` stage: the checkpoint `model.init` names, fetched once into models/init (`bertpipe.init.folder`).

A Hugging Face model id is downloaded with `huggingface_hub.snapshot_download` at `model.init_revision` (main
when empty), only the files a BERT's weights, config and tokenizer are (`PATTERNS`: never a pickle), into the
Hugging Face cache, then copied out; the commit the revision resolved to is recorded, so `dvc repro` is
reproducible and, once cached, runs offline (HF_HUB_OFFLINE=1). A folder (a previous export, or your own copy of
a Hub model) is copied the same way, relative paths from the repository (`bertpipe.repo`). Either is checked
before it replaces models/init (`check_checkpoint`); anything wrong is one line and an earlier models/init
stays. With model.init empty the folder is a marker, written in milliseconds, and nothing is imported.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from bertpipe.atomic import atomic_dir, write_json
from bertpipe.config import ModelConfig
from bertpipe.errors import ConfigError, first_line
from bertpipe.init import folder as init_folder
from bertpipe.init.folder import EXPORT_RECORD, RECORD, TOKENIZER, InitError
from bertpipe.repo import repo_path

log = logging.getLogger(__name__)
PATTERNS = ("config.json", "*.safetensors", init_folder.WEIGHT_INDEX, *init_folder.TOKENIZER_FILES, EXPORT_RECORD)


def fetch_init(cfg: ModelConfig, out_dir: Path) -> dict[str, Any]:
    """models/init for `model.init` (whole or not at all); returns metrics/init.json: what was fetched, the
    resolved commit, the weights' sha256 and sizes."""
    with atomic_dir(out_dir) as folder:
        if not cfg.init:
            write_json(folder / RECORD, {"model": ""})
            return {"init": ""}
        local = _local_folder(cfg)
        if local is not None:
            commit, name, offered = None, str(local), _copy(local, folder)
        else:
            snapshot = _download(cfg.init, cfg.init_revision)
            commit, name, offered = snapshot.name, f"{cfg.init} (commit {snapshot.name})", _copy(snapshot, folder)
            if not init_folder.weight_files(folder):
                offered = _hub_files(cfg.init, commit)
        config = init_folder.check_model(folder, name, offered)
        if not (folder / TOKENIZER).is_file() and (folder / "vocab.txt").is_file():
            _build_tokenizer_json(folder, name)
        init_folder.check_tokenizer(folder, name, config)
        weights = init_folder.sha256_of(init_folder.weight_files(folder))
        record = {"model": cfg.init, "revision": cfg.init_revision, "commit": commit, "weights_sha256": weights,
                  "run": _export_record(folder)}
        write_json(folder / RECORD, record)
    log.info("model.init: %s, %d layers of %d, %d tokens, weights sha256 %s", name, config["num_hidden_layers"],
             config["hidden_size"], config["vocab_size"], record["weights_sha256"][:12])
    run = record["run"] or {}
    return {"init": cfg.init, "revision": cfg.init_revision, "commit": commit,
            "weights_sha256": record["weights_sha256"], "init_run_id": run.get("mlflow_run_id"),
            **{key: config.get(key) for key in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                "max_position_embeddings")}}


def _local_folder(cfg: ModelConfig) -> Path | None:
    """model.init as a folder: one that exists, from the repository when relative; None for a Hub id. A value
    written as a path (`./x`, `/x`, `~/x`) that is no folder is refused rather than asked of the Hub."""
    path = repo_path(cfg.init)
    if path.is_dir():
        if cfg.init_revision:
            raise ConfigError("model.init_revision", cfg.init_revision, f"empty for a folder ({path}: a revision "
                                                                        "is the Hub's)")
        return path
    if cfg.init.startswith((".", "/", "~")) or cfg.init.count("/") > 1:
        raise ConfigError("model.init", cfg.init, f"an existing folder ({path} is none) or a Hugging Face model id "
                                                  "(bert-base-uncased, google/bert_uncased_L-2_H-128_A-2)")
    return None


def _copy(source: Path, folder: Path) -> list[str]:
    """The files of a BERT (`PATTERNS`: never a pickle) from `source` into `folder`; returns every file name
    `source` holds."""
    names = sorted(p.name for p in source.iterdir() if p.is_file())
    for name in names:
        if any(fnmatch.fnmatch(name, pattern) for pattern in PATTERNS):
            shutil.copyfile(source / name, folder / name)  # a Hub snapshot's files are links into its blobs
    return names


def _download(repo_id: str, revision: str) -> Path:
    """The Hub's snapshot of `repo_id` at `revision` in the Hugging Face cache (HF_HOME), as snapshot_download
    gives it (a folder named after the commit); each failure as one line."""
    from huggingface_hub import errors as hub
    from huggingface_hub import snapshot_download

    log.info("fetching %s (revision %s) from the Hugging Face Hub", repo_id, revision or "main")
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=list(PATTERNS)))
    except hub.GatedRepoError:
        raise InitError(f"{repo_id} is gated on the Hugging Face Hub: accept its terms there, set HF_TOKEN") from None
    except hub.RevisionNotFoundError:
        raise ConfigError("model.init_revision", revision, f"a branch, tag or commit of {repo_id} on the Hugging Face "
                                                           "Hub (HTTP 404 for this one)") from None
    except hub.RepositoryNotFoundError:
        raise ConfigError("model.init", repo_id, "a model id on the Hugging Face Hub (HTTP 404: no such model, or a "
                                                 "private one without HF_TOKEN) or an existing folder") from None
    except hub.LocalEntryNotFoundError as err:
        raise InitError(f"{repo_id} cannot be fetched: the Hugging Face Hub is not reachable (or HF_HUB_OFFLINE is "
                        f"set) and the cache holds no copy of revision {revision or 'main'} ({first_line(err)}); "
                        "fetch it once online, or set model.init to a folder holding it") from None
    except (hub.HFValidationError, hub.HfHubHTTPError) as err:
        raise InitError(f"{repo_id} cannot be fetched from the Hugging Face Hub ({first_line(err)})") from None
    return snapshot


def _hub_files(repo_id: str, commit: str) -> list[str]:
    """The files of a commit on the Hub (snapshot_download fetched only `PATTERNS`), to tell a pickle-only
    checkpoint from one without weights; nothing is known offline."""
    from huggingface_hub import list_repo_files
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return list_repo_files(repo_id, revision=commit)
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError):
        return []


def _build_tokenizer_json(folder: Path, name: str) -> None:
    """tokenizer.json for a checkpoint that has only vocab.txt and tokenizer_config.json: the fast tokenizer
    transformers builds from them (`AutoTokenizer`), so every stage reads text as transformers reads it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise InitError(f"{name}'s tokenizer cannot be built from its vocab.txt ({first_line(err)})") from None
    tokenizer.backend_tokenizer.save(str(folder / TOKENIZER))


def _export_record(folder: Path) -> dict[str, Any] | None:
    """A bertpipe export's bertpipe.json (its MLflow run and step), so the new run can name the one it continues."""
    try:
        record = json.loads((folder / EXPORT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
