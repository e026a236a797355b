"""bertpipe: a reproducible BERT pretraining pipeline (a corpus -> DVC stages -> an exported BERT).

Packages by the pipeline's concerns: `data` (download, prepare, examples), `model`, `training`
(pretrain), `tracking` (MLflow), `export`; the plumbing every stage shares at the top (`config`,
`resolve`, `stage`, `errors`, `atomic`, `progress`, `repo`, `vocab`) and the `bertpipe` command (`cli`).
"""

__version__ = "0.1.0"
