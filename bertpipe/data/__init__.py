"""The data stages: a corpus downloaded or taken from your folder, read into sentences, tokenized, and made
into masked-LM / next-sentence examples.

download -> `datasets`, `download`, `archive`, `ingest`; prepare -> `corpus`, `words`, `splits`, `sentences`,
`tokenizer`, `wordpiece`, `prepare`; examples -> `pairs`, `examples`; `arrays` holds the `.npy` layout they share.
"""
