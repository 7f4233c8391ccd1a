"""Reading local Hugging Face datasets (`data.source: hf`) with the optional `datasets` library.

A path is a JSON or JSON Lines file (`.json`, `.jsonl`), a Parquet file (`.parquet`), an Arrow file
(`.arrow`), or a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`. Rows are
checked as in `formats.py`; a problem names the path and the row index (0-based: `ds[16]` opens it).
Nothing is downloaded and nothing is written: the dataset is read into memory with a throwaway
cache directory, so ranks that read one file at once share no cache lock.
"""

from __future__ import annotations

import os
import tempfile

from .errors import DataError
from .formats import Row, parse_row

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
INSTALL = "pip install 'fdlora-cluster[hf]' (or pip install datasets)"


def _open(path: str, split: str | None):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: data.source 'hf' reads datasets with the `datasets` library, which is not "
                        f"installed: {INSTALL}") from None
    datasets.disable_progress_bars()
    if os.path.isdir(path):
        load = lambda: datasets.load_from_disk(path, keep_in_memory=True)  # noqa: E731
    else:
        builder = BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise DataError(f"{path}: not a dataset this reads; give a {', '.join(BUILDERS)} file or a directory "
                            "written by save_to_disk")
        load = lambda: datasets.load_dataset(builder, data_files=path, split="train",  # noqa: E731
                                             cache_dir=cache, keep_in_memory=True)
    with tempfile.TemporaryDirectory(prefix="fdlora-hf-") as cache:
        try:
            ds = load()
        except Exception as e:  # datasets and pyarrow raise many types for one unreadable file; one message
            while e.__cause__ is not None:  # the error datasets wrapped says what is wrong (pyarrow's: "JSON
                e = e.__cause__             # parse error ... in row 1"); its __context__ is a fallback's
            first = (str(e).strip().splitlines() or [""])[0]
            raise DataError(f"{path}: the datasets library cannot read it ({type(e).__name__}: {first})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise DataError(f"{path}: a dataset with splits {sorted(ds)}; set data.split to one of them"
                            + (f" (data.split = {split!r})" if split is not None else ""))
        ds = ds[split]
    return ds


def read_dataset(path: str, split: str | None = None) -> list[Row]:
    """All rows of one local dataset; DataError naming the path and row on the first bad row."""
    ds = _open(path, split)
    # Arrow columns are shared by all rows, so a key one row lacks reads as None in the others:
    # None is "absent" here (a JSONL null still is an error, see jsonl.py).
    rows = [parse_row({k: v for k, v in rec.items() if v is not None}, f"{path} row {i}")
            for i, rec in enumerate(ds)]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows
