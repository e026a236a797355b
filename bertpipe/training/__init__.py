"""The pretrain stage: `pretrain` builds, resumes and reports the run, `loop` trains it (one step top to bottom,
evaluation, the checkpointer), from `batches` on `precision`'s compute copy with `optim`'s optimizer;
`checkpoint` and `workdir` keep it resumable, `distributed` spreads it over processes, `plots` draws its curves."""
