"""Shards: naming them, dealing them out to readers, and reading their samples out of the tars.

- `expand_shards` turns patterns into URLs; `check_local_shards` fails at once on a mistyped path.
- `shards_for_worker`: each source's shard list is shuffled with a seed that every rank shares (so
  all agree on the order), then dealt out by rank and by worker, so each shard is read by exactly
  one reader and no sample is seen twice.
- `read_shard`: webdataset opens the URL (local path, `pipe:`, http, ...) and iterates the tar;
  files are grouped into samples by key within one shard only, so a sample can never take a file
  from a neighbour or from another shard. `has_end_of_archive` catches a tar cut between members.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import webdataset
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from multimodal.data.decode import DUPLICATE_FILE, SHARD_ERROR, SPLIT_SAMPLE
from multimodal.data.skips import SkipBudgetExceeded, SkipCounter

logger = logging.getLogger("multimodal.data")


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard URLs from a pattern or a list of patterns (braces and `::` expanded by webdataset)."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    return [url for pattern in patterns for url in expand_urls(pattern)]


def local_path(url: str) -> str | None:
    """The file a URL names when it is a local file, else None (pipe:, http:, ...)."""
    if url.startswith("file:"):
        return url[len("file:"):]
    return None if ":" in url.split("/", 1)[0] else url


def shards_for_worker(urls: Sequence[str], seed: int, epoch: int, shuffle: bool,
                      rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """This reader's shards for `epoch`. Every reader shuffles the full list with the same seed,
    then takes every (world_size)-th shard from its rank, then every (num_workers)-th of those
    from its worker: together the readers partition the list."""
    urls = list(urls)
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(urls)
    return urls[rank::world_size][worker::num_workers]


def check_local_shards(urls: Sequence[str]) -> None:
    """Fail at once on a mistyped path, rather than training on nothing with a log full of skips."""
    missing = [url for url in urls if (path := local_path(url)) is not None and not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]!r}; "
                                "check DataConfig.shards (brace patterns: data/train-{000..009}.tar)")


def read_shard(url: str, skips: SkipCounter, skip_first: int = 0) -> Iterator[dict[str, Any]]:
    """The samples of one shard in tar order: {"__key__", "__url__", suffix: bytes, ...}.

    A file's key is its name up to the first dot ("a/b.0.jpg" -> key "a/b", suffix "0.jpg"), as in
    webdataset. Unlike webdataset's own grouping, a sample never spans two shards, and a key that
    comes back later in the shard, or a suffix twice in one sample, is skipped rather than merged:
    either would pair one sample's image with another one's text. An unreadable shard or a tar that
    breaks off is counted once (shard_error); the sample being read when it broke is dropped.

    `skip_first` (resuming): the first samples are read past without being handed on, and skips met
    before them are not counted again (the saved counts hold them); a shard that now has fewer
    samples than that has changed since the checkpoint: RuntimeError.
    """
    handed = 0

    def report(reason: str, key: str | None, detail: str) -> None:
        if handed >= skip_first:
            skips.skip(reason, url, key, detail)

    def complete(sample: dict[str, Any]) -> Iterator[dict[str, Any]]:
        # The sample, or nothing (a counted skip) if grouping found it broken.
        nonlocal handed
        if "__skip__" in sample:
            reason, detail = sample["__skip__"]
            report(reason, sample["__key__"], detail)
            return
        if handed >= skip_first:
            handed += 1
            yield sample
        else:
            handed += 1

    try:
        stream = webdataset.gopen(url)
    except Exception as error:  # missing file, failed command, refused connection, ...
        report(SHARD_ERROR, None, f"cannot open: {type(error).__name__}: {error}")
        stream = None
    if stream is not None:
        seen: set[str] = set()
        current: dict[str, Any] | None = None
        try:
            for file in tar_file_iterator(stream):
                key, suffix = base_plus_ext(file["fname"])
                if key is None:  # no extension: not part of any sample
                    continue
                suffix = suffix.lower()
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield from complete(current)
                    current = {"__key__": key, "__url__": url}
                    if key in seen:
                        current["__skip__"] = (SPLIT_SAMPLE, "the key's files are not contiguous in the tar")
                    seen.add(key)
                if suffix in current:
                    current["__skip__"] = (DUPLICATE_FILE, f"{suffix!r} appears twice")
                current[suffix] = file["data"]
        except SkipBudgetExceeded:
            raise
        except Exception as error:  # a truncated or corrupt tar stream
            report(SHARD_ERROR, None, f"tar stream broke off: {type(error).__name__}: {error}")
            current = None
        finally:
            try:
                stream.close()
            except Exception as error:  # a pipe: command closed early exits non-zero; nothing to do
                logger.debug("closing %s: %s", url, error)
        if current is not None:
            yield from complete(current)
            if not has_end_of_archive(url):
                report(SHARD_ERROR, None, "the tar has no end-of-archive marker: it was cut short after its "
                                          "last complete file, and what followed is lost")
    if handed < skip_first:
        raise RuntimeError(f"{url} now holds {handed} readable samples, but the checkpoint had read {skip_first} "
                           "of them: the shard changed since the checkpoint was written")


def has_end_of_archive(url: str) -> bool:
    """False when a local, uncompressed .tar lacks the two zero blocks every tar writer puts at its
    end: a tar cut exactly between two members reads without error, so this is the only sign that
    samples were lost. Other URLs and compressed shards cannot be checked this way: True."""
    path = local_path(url)
    if path is None or not path.endswith(".tar"):
        return True
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        if size < 1024:
            return False
        file.seek(size - 1024)
        return not any(file.read(1024))

