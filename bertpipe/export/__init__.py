"""The export stage and what uses its folder: `export` writes the Hugging Face folder and the tables,
`hf_compat` maps our BERT to Hugging Face's files, `encode` turns text into vectors and answers."""
