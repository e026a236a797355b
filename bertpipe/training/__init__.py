"""The pretrain stage: `pretrain` builds and reports the run, `loop` trains it (`step`, `batches`,
`precision`, `optim`, `evaluate`), `checkpoint`, `workdir` and `resume` keep it resumable,
`distributed` spreads it over processes, `plots` draws its curves."""
