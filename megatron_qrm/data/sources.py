"""Reading raw records (dicts) from JSON Lines, Parquet and ``datasets`` sources, with their locations.

Every record comes with a human-readable location so that a bad record can be reported precisely:

* ``"FILE:LINE"`` for JSON Lines (plain or gzip-compressed), 1-based line numbers as an editor shows them;
* ``"FILE:row N"`` for Parquet files, JSON array files and ``datasets`` datasets, with ``N`` the 0-based
  row index (the index ``dataset[N]`` / ``table.slice(N, 1)`` takes).

The format is recognised by content where possible (gzip and Parquet magic bytes), so a file's name does
not have to follow a convention. Accepted sources:

* a ``.jsonl`` / ``.jsonl.gz`` / ``.json`` / any-text file of JSON objects, one per line (blank lines are
  skipped, and counted in the caller's ``stats["skipped_blank_lines"]``); a ``.json`` file whose first character is ``[`` is read as one JSON array of objects;
* a Parquet file (read with pyarrow, in record batches, so large files are not loaded at once);
* a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` from which
  ``split`` is taken);
* anything else ``datasets.load_dataset(path, split=split)`` understands: a local directory of data files,
  a local loading script directory, or a dataset name on the Hub (when the Hub is reachable).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_qrm.errors import UserError

_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
#: Suffixes that make a missing ``path`` a missing *file* (not a dataset name to try on the Hub).
_FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".ndjson", ".txt", ".arrow")


class DataError(UserError):
    """A data source or one of its records is unusable; the message starts with its location."""


def read_records(path: str | os.PathLike, split: str = "train",
                 stats: dict[str, int] | None = None) -> Iterator[tuple[str, dict]]:
    """Iterate ``(location, record)`` over every record of the source at ``path``.

    The source is opened (and a missing one reported) at the call; records are read lazily.

    Args:
        path: a file, a ``save_to_disk`` directory, or a ``datasets.load_dataset`` name/path.
        split: the split to read from a ``DatasetDict`` / ``load_dataset`` source (ignored for files).
        stats: the caller's skip counters: ``stats["skipped_blank_lines"]`` counts the blank (whitespace-only)
            lines of a JSON Lines file, which are skipped (line numbers still count them).

    Raises:
        DataError: the source does not exist or cannot be read, a line is not valid JSON, or a record is
            not a JSON object. The message names the location (``FILE:LINE`` where there is one).
    """
    # A plain function returning a generator: a missing path fails at the call, not at first iteration.
    name = os.fspath(path)
    p = Path(name).expanduser()
    if p.is_file():
        return _read_file(p, name, stats)
    if p.is_dir():
        return _read_dataset_dir(p, name, split)
    if _looks_like_local_path(name):
        raise DataError(f"{name}: no such file or directory")
    return _read_hub_dataset(name, split)


def _looks_like_local_path(name: str) -> bool:
    """Whether a non-existent ``name`` was meant as a local path rather than a ``load_dataset`` name."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.lower().endswith(_FILE_SUFFIXES)
        # Hub ids are "name" or "owner/name"; deeper paths can only be local.
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
    )


def _read_file(p: Path, name: str, stats: dict[str, int] | None = None) -> Iterator[tuple[str, dict]]:
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise DataError(f"{name}: cannot read ({err})") from err
    if head == _PARQUET_MAGIC:
        return _read_parquet(p, name)
    if head[:2] == _GZIP_MAGIC:
        return _read_json_lines(p, name, compressed=True, stats=stats)
    if p.suffix.lower() == ".json" and _first_non_space(p) == b"[":
        return _read_json_array(p, name)
    return _read_json_lines(p, name, compressed=False, stats=stats)


def _first_non_space(p: Path) -> bytes:
    with open(p, "rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip().lstrip(b"\xef\xbb\xbf").lstrip()  # whitespace and a UTF-8 BOM
            if stripped:
                return stripped[:1]
    return b""


def _as_record(obj: Any, loc: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{loc}: expected a JSON object (one record per line), got {type(obj).__name__}")
    return obj


def _read_json_lines(p: Path, name: str, compressed: bool,
                     stats: dict[str, int] | None = None) -> Iterator[tuple[str, dict]]:
    opener = gzip.open if compressed else open
    if stats is not None:
        stats.setdefault("skipped_blank_lines", 0)
    try:
        with opener(p, "rb") as f:
            # Bytes, decoded per line: a UTF-8 error is then reported with its line number instead of
            # surfacing from some read-ahead buffer.
            for lineno, raw in enumerate(f, start=1):
                loc = f"{name}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{loc}: not valid UTF-8 ({err})") from err
                if not line.strip():
                    if stats is not None:
                        stats["skipped_blank_lines"] += 1
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{loc}: malformed JSON ({err})") from err
                yield loc, _as_record(obj, loc)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{name}: cannot read ({type(err).__name__}: {err})") from err


def _read_json_array(p: Path, name: str) -> Iterator[tuple[str, dict]]:
    try:
        with open(p, encoding="utf-8-sig") as f:
            items = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{name}:{err.lineno}: malformed JSON ({err})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{name}: cannot read ({err})") from err
    for i, obj in enumerate(items):
        loc = f"{name}:row {i}"
        yield loc, _as_record(obj, loc)


def _read_parquet(p: Path, name: str) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
        batches = pf.iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for rec in batch.to_pylist():
                yield f"{name}:row {row}", rec
                row += 1
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{name}: cannot read as Parquet ({err})") from err


def _iter_dataset(ds: Any, name: str) -> Iterator[tuple[str, dict]]:
    for i, rec in enumerate(ds):
        yield f"{name}:row {i}", rec


def _pick_split(dd: Any, name: str, split: str) -> Any:
    if split not in dd:
        raise DataError(f"{name}: no split {split!r} (available: {', '.join(sorted(dd.keys()))}); use --split")
    return dd[split]


def _read_dataset_dir(p: Path, name: str, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        # Written by save_to_disk (DatasetDict / Dataset respectively).
        try:
            loaded = datasets.load_from_disk(str(p))
        except Exception as err:  # datasets raises a variety of types for a damaged directory
            raise DataError(f"{name}: cannot load with datasets.load_from_disk ({err})") from err
        ds = _pick_split(loaded, name, split) if isinstance(loaded, datasets.DatasetDict) else loaded
        return _iter_dataset(ds, name)
    return _read_hub_dataset(name, split)


def _read_hub_dataset(name: str, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # FileNotFoundError, DatasetNotFoundError, ValueError (bad split), ...
        raise DataError(
            f"{name}: not a readable file and datasets.load_dataset({name!r}, split={split!r}) failed "
            f"({type(err).__name__}: {err})"
        ) from err
    return _iter_dataset(ds, name)
