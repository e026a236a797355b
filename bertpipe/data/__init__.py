"""The data stages: a corpus downloaded or taken from your folder, read into sentences, tokenized, and made
into masked-LM / next-sentence examples.

download -> `datasets`, `download`, `ingest`; prepare -> `corpus`, `sentences`, `tokenizer`, `wordpiece`,
`prepare`; examples -> `pairs`, `examples`; `arrays` holds the `.npy` layout they share.
"""
