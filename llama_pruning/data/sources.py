"""Text sources: named corpora (wikitext2, ptb, c4) and local files, resolved to rows of text.

A named corpus has two splits, by purpose: `calibration` (text pruning may look at: a train split)
and `evaluation` (the held-out split perplexity is measured on). Calibration never reads an evaluation
split. Resolution order, first hit wins:

1. an explicit local path given as the dataset (`.jsonl` / `.jsonl.gz` / `.json.gz`: one JSON object
   per line with a `text` field; any other file, e.g. `.txt`: plain text, one row per line);
2. the copy packaged with llama-pruning (wikitext2 only: `llama_pruning/data/wikitext2/*.xz`, decompressed in
   memory and checked against its sha256, so the default run needs no network and no environment variable);
3. the offline folder named by the `LLAMA_PRUNING_DATA` environment variable (layout in `DATASETS`);
4. `datasets.load_dataset` from the Hugging Face hub (streamed), announced once on stderr before it is tried.

Every source is cleaned the same way: rows are read in text mode (universal newlines, a UTF-8 BOM is
dropped), lose their trailing newline, and rows that are empty or whitespace only are skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Literal

DATA_ENV = "LLAMA_PRUNING_DATA"
Split = Literal["calibration", "evaluation"]
SPLITS: tuple[str, ...] = ("calibration", "evaluation")
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")


class DataError(ValueError):
    """Text that cannot be found or does not fit the request (one line that says what to do)."""


@dataclass(frozen=True)
class PackagedFile:
    """A text file shipped xz-compressed inside the package, with the sha256 of its original bytes."""

    name: str  # relative to llama_pruning/data/, without the .xz suffix
    sha256: str


@dataclass(frozen=True)
class SplitSource:
    """Where one split of a named corpus lives: packaged, in the offline folder, online."""

    hf_split: str
    offline_files: tuple[str, ...]  # relative to the offline folder; the first that exists is used
    data_files: dict[str, str] | None = None
    max_rows: int | None = None  # only the first rows (documents) are read; None = all
    packaged: PackagedFile | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """A named corpus: its hub location, the field holding text, and how rows are joined into one text."""

    name: str
    label: str
    hf_path: str
    hf_name: str | None
    text_field: str
    joiner: str
    strip_rows: bool  # strip both ends of each row (what the hub loader of ptb_text_only does)
    splits: dict[str, SplitSource] = field(default_factory=dict)

    def hub_call(self, split: str) -> str:
        """The `datasets.load_dataset` call for a split, as text for messages."""
        src = self.splits[split]
        args = [repr(self.hf_path)] + ([repr(self.hf_name)] if self.hf_name else [])
        if src.data_files:
            args.append(f"data_files={src.data_files!r}")
        return f"datasets.load_dataset({', '.join(args)}, split={src.hf_split!r})"


_C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
_C4_VALID = "en/c4-validation.00000-of-00008.json.gz"

DATASETS: dict[str, DatasetInfo] = {
    "wikitext2": DatasetInfo(
        name="wikitext2",
        label="wikitext2 (wikitext-2-raw-v1)",
        hf_path="wikitext",
        hf_name="wikitext-2-raw-v1",
        text_field="text",
        joiner="\n\n",
        strip_rows=False,
        splits={
            # offline, the tokenized validation release stands in for the (large) train split
            "calibration": SplitSource("train", ("wikitext2/wiki.valid.tokens",), packaged=PackagedFile(
                "wikitext2/wiki.valid.tokens", "e24057b96f875e4ac4a5f347fa6c64438ef8322b6e41abb4d187ef0d4e150505")),
            "evaluation": SplitSource("test", ("wikitext2/wiki.test.raw",), packaged=PackagedFile(
                "wikitext2/wiki.test.raw", "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c")),
        },
    ),
    "ptb": DatasetInfo(
        name="ptb",
        label="ptb (ptb_text_only)",
        hf_path="ptb_text_only",
        hf_name="penn_treebank",
        text_field="sentence",
        joiner=" ",
        strip_rows=True,
        splits={
            "calibration": SplitSource("train", ("ptb/ptb.train.txt",)),
            "evaluation": SplitSource("test", ("ptb/ptb.test.txt",)),
        },
    ),
    "c4": DatasetInfo(
        name="c4",
        label="c4 (allenai/c4 en)",
        hf_path="allenai/c4",
        hf_name=None,
        text_field="text",
        joiner=" ",
        strip_rows=False,
        splits={
            # first shard of each split only; the usual convention evaluates the first 1,100 validation documents
            "calibration": SplitSource("train", ("c4/c4-train.00000-of-01024.json.gz",),
                                       data_files={"train": _C4_TRAIN}, max_rows=5000),
            "evaluation": SplitSource("validation", ("c4/c4-validation.00000-of-00008.json.gz",),
                                      data_files={"validation": _C4_VALID}, max_rows=1100),
        },
    ),
}
_EVALUATION_FILES = {Path(f).name for info in DATASETS.values() for f in info.splits["evaluation"].offline_files}


@dataclass(frozen=True)
class TextSource:
    """Clean rows of one split, where they came from, and the name results are reported under."""

    label: str
    origin: str
    rows: list[str]
    joiner: str

    @property
    def text(self) -> str:
        """The rows joined into the one text that is tokenized (once) for windows."""
        return self.joiner.join(self.rows)


def clean_rows(rows: Iterable[str], strip: bool = False) -> list[str]:
    """Rows without their trailing newline (or stripped), empty and whitespace-only rows dropped."""
    cleaned = (row.strip() if strip else row.rstrip("\n") for row in rows)
    return [row for row in cleaned if row.strip()]


def is_local_path(dataset: str) -> bool:
    """True when `dataset` names a file (by its suffix, or an existing file that is not a corpus name)."""
    return dataset.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES) or (dataset not in DATASETS and Path(dataset).is_file())


def read_file_rows(path: str | Path, text_field: str = "text", max_rows: int | None = None) -> list[str]:
    """Raw rows of a local file: JSON lines (`.jsonl`, `.jsonl.gz`, `.json.gz`: the `text_field` of each object),
    anything else read as plain text, one row per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as handle:  # utf-8-sig drops a leading BOM
        return _parse_rows(handle, path, text_field, max_rows)


def _parse_rows(handle: Iterable[str], path: str | Path, text_field: str, max_rows: int | None) -> list[str]:
    """Rows of an open text handle: JSON lines when `path` names a JSON-lines file, else one row per line."""
    lines = islice(handle, max_rows)
    if not str(path).endswith(JSONL_SUFFIXES):
        return list(lines)
    rows = []
    for number, record in json_lines(lines, path, DataError):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{path}:{number} has no string field {text_field!r}")
        rows.append(record[text_field])
    return rows


def json_lines(lines: Iterable[str], path: str | Path, error: type[Exception]) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) of each non-blank JSON line; `error` names the file and line of one that is not JSON."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{number} is not a JSON object: {err}") from None


def packaged_data() -> resources.abc.Traversable:
    """The folder of text files shipped inside the package (llama_pruning/data/)."""
    return resources.files(__package__)


def read_packaged_rows(packaged: PackagedFile) -> list[str] | None:
    """Raw rows of a packaged file (None when it is not installed); its bytes must match the recorded sha256."""
    path = packaged_data().joinpath(f"{packaged.name}.xz")
    if not path.is_file():
        return None
    raw = lzma.decompress(path.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != packaged.sha256:
        raise DataError(f"packaged {packaged.name} is corrupt (sha256 {digest[:12]}..., expected "
                        f"{packaged.sha256[:12]}...): reinstall llama-pruning")
    # text mode as for a local file: universal newlines, a leading BOM dropped
    return _parse_rows(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig"), packaged.name, "text", None)


def offline_dir() -> Path | None:
    """The offline data folder from `LLAMA_PRUNING_DATA`, or None when unset."""
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def _hub_rows(info: DatasetInfo, split: str) -> list[str]:
    """Rows of a split streamed from the hub (only `max_rows` of them are read)."""
    import datasets

    src = info.splits[split]
    stream = datasets.load_dataset(info.hf_path, info.hf_name, split=src.hf_split, data_files=src.data_files,
                                   streaming=True)
    return [example[info.text_field] for example in islice(stream, src.max_rows)]


def load_text(dataset: str, split: Split = "evaluation") -> TextSource:
    """Clean rows of `dataset` (a corpus name or a local file) for one split; raises DataError when unreachable."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if is_local_path(dataset):
        if split == "calibration" and Path(dataset).name in _EVALUATION_FILES:
            raise DataError(f"{dataset} is an evaluation split: calibration must never use test text")
        rows = clean_rows(read_file_rows(dataset))
        if not rows:  # refused now, not after the model has loaded to tokenize it
            raise DataError(f"{dataset} holds no text")
        return TextSource(dataset, str(dataset), rows, "\n\n")
    info = DATASETS.get(dataset)
    if info is None:
        raise DataError(
            f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}, "
            f"or give a path to a {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} file"
        )
    src = info.splits[split]
    if src.packaged is not None:
        rows = read_packaged_rows(src.packaged)
        if rows is not None:
            origin = f"{src.packaged.name} (packaged with llama-pruning)"
            return TextSource(info.label, origin, clean_rows(rows, info.strip_rows), info.joiner)
    folder = offline_dir()
    if folder is not None:
        for name in src.offline_files:
            if (folder / name).is_file():
                rows = read_file_rows(folder / name, info.text_field, src.max_rows)
                return TextSource(info.label, str(folder / name), clean_rows(rows, info.strip_rows), info.joiner)
    print(f"{dataset} ({split} split) is not available offline; trying the Hugging Face hub: {info.hub_call(split)}",
          file=sys.stderr, flush=True)
    try:
        rows = _hub_rows(info, split)
    except Exception as err:  # any failure to reach the hub becomes one actionable message
        raise DataError(_unreachable_message(dataset, split, info, folder, err)) from None
    return TextSource(info.label, info.hub_call(split), clean_rows(rows, info.strip_rows), info.joiner)


def _unreachable_message(dataset: str, split: str, info: DatasetInfo, folder: Path | None, err: Exception) -> str:
    """One line: which offline files were looked for and where, why the hub failed, and what to do."""
    src = info.splits[split]
    files = " or ".join(Path(name).name for name in src.offline_files)
    if folder is None:
        where = f"{DATA_ENV} is not set"
    elif not folder.is_dir():
        where = f"{DATA_ENV}={folder} does not exist"
    else:
        where = f"not in {DATA_ENV}={folder} (expected {' or '.join(str(folder / n) for n in src.offline_files)})"
    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    advice = (f"pass --dataset with a local .txt/.jsonl file, or set {DATA_ENV} to a folder holding {src.offline_files[0]}"
              if split == "calibration" else f"set {DATA_ENV} to a folder holding {src.offline_files[0]}")
    return (f"cannot load {dataset} ({split} split): no offline {files} ({where}), and {info.hub_call(split)} "
            f"failed ({reason}); {advice}")


def get_text_rows(dataset: str, split: Split = "calibration") -> list[str]:
    """Clean rows of a split (for fine-tuning or custom windowing)."""
    return load_text(dataset, split).rows


def get_eval_text(dataset: str) -> str:
    """The evaluation text of `dataset`: its rows joined as the perplexity protocol prescribes."""
    return load_text(dataset, "evaluation").text
