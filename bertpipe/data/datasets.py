"""The corpora `data.dataset` names: WikiText-2 and WikiText-103 (v1, tokenized), their mirrors and records.

Merity et al. 2016, "Pointer Sentinel Mixture Models". Both archives hold a folder of three split files
(`wiki.{train,valid,test}.tokens`). Mirrors, tried in order: the dataset author's host, the original S3
address (dead since ~2024, kept in case it returns) and Hugging Face's parquet conversion of
`Salesforce/wikitext` at a pinned revision, which `bertpipe.data.download` turns back into the original bytes.

Where the records come from: WikiText-2's sha1 is d2l's (`DATA_HUB['wikitext-2']`); its valid and
test files' sizes, lines and sha256 were read off the original files, its train file's size and lines
off the archive (no trusted sha256 of it was available offline). WikiText-103's sha256 is the one
Hugging Face's former `wikitext.py` loading script and MLDatasets.jl record (torchtext records its
md5, 9ddaacaf6af0710eda8c456decff7832), its line counts torchtext's; no trusted size or sha256 of its
split files was available offline, so the parquet route checks their line counts only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_HF = "https://huggingface.co/datasets/Salesforce/wikitext/resolve/b08601e04326c79dfdd32d625aee71d232d685c3"


@dataclass(frozen=True)
class SplitRecord:
    """What is known of an original split file, to check one rebuilt from parquet."""

    lines: int
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Dataset:
    """A downloadable corpus: where it is, how to verify it, and the parquet shards of each split file."""

    name: str
    urls: tuple[str, ...]
    checksum: str  # of the zip archive
    records: dict[str, SplitRecord]
    parquet_files: dict[str, tuple[str, ...]] = field(default_factory=dict)


DATASETS = {
    "wikitext-2": Dataset(
        name="wikitext-2",
        urls=("https://wikitext.smerity.com/wikitext-2-v1.zip",
              "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
              f"{_HF}/wikitext-2-v1/"),
        checksum="sha1:3c914d17d80b1459be871a5039ac23e752a53cbe",
        records={
            "wiki.train.tokens": SplitRecord(lines=36_718, size=10_797_148),
            "wiki.valid.tokens": SplitRecord(
                lines=3_760, size=1_121_681,
                sha256="f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
            "wiki.test.tokens": SplitRecord(
                lines=4_358, size=1_256_449,
                sha256="d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
        },
        parquet_files={"wiki.train.tokens": ("train-00000-of-00001.parquet",),
                       "wiki.valid.tokens": ("validation-00000-of-00001.parquet",),
                       "wiki.test.tokens": ("test-00000-of-00001.parquet",)}),
    "wikitext-103": Dataset(
        name="wikitext-103",
        urls=("https://wikitext.smerity.com/wikitext-103-v1.zip",
              "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
              f"{_HF}/wikitext-103-v1/"),
        checksum="sha256:242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
        records={"wiki.train.tokens": SplitRecord(lines=1_801_350), "wiki.valid.tokens": SplitRecord(lines=3_760),
                 "wiki.test.tokens": SplitRecord(lines=4_358)},
        parquet_files={"wiki.train.tokens": ("train-00000-of-00002.parquet", "train-00001-of-00002.parquet"),
                       "wiki.valid.tokens": ("validation-00000-of-00001.parquet",),
                       "wiki.test.tokens": ("test-00000-of-00001.parquet",)}),
}
