"""bertpipe: a reproducible BERT pretraining pipeline (WikiText-2 -> DVC stages -> exported BERT)."""

__version__ = "0.1.0"
