"""The downstream evaluation: GLUE (or your own labelled task) fine-tuned from each export.

- `glue`: GLUE's tasks, their original files and parquet copy, checksums and split records, and how each is read.
- `own`: a folder of your own labelled task (csv, tsv, jsonl, parquet) checked and read.
- `tasks`: the `tasks` stage (data/tasks/: one format, written and read here) that fetches and verifies them.
- `metrics`: each task's metrics (scikit-learn, scipy), the majority class, and the aggregate score's rule.
- `finetune`: one fine-tuning run with transformers' AutoModelForSequenceClassification, scored per epoch.
- `workers`: runs one after another here, or several at once in worker processes of one thread each.
- `downstream`: the `downstream` stage: every task, seed and start (pretrained or random), resumable; the report.
"""
