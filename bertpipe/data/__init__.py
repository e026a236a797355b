"""The data stages: a corpus downloaded or taken from your folder, read into sentences, tokenized, and made
into masked-LM / next-sentence examples.

download -> `datasets`, `download`, `archive`, `layout`, `ingest`; prepare -> `corpus`, `lines`, `words`,
`sentences`, `tokenizer`, `wordpiece`, `prepare`; examples -> `pairs`, `examples`. The folders between the
stages are each one module's, writer and reader together: `raw_folder`, `prepared_folder`, `examples_folder`
(built on `arrays`, generic `.npy` I/O).
"""
