"""What a run trains and is scored on, in a few bytes: each split's row count and a SHA-256 of its rows.

An image a row names by path (an imagefolder's) is hashed by its file's bytes, not its path, so a data
set moved whole is the same data and one edited in place is not. A checkpoint records this (--resume
on data changed since is refused, naming the split), and the base model's cached score is keyed by
the test split's. Its cost is one read of every row and image file, which the data checks make anyway:
the built-in set's 975 rows take 49 ms here (docs/outputs.md gives a larger set's cost).
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import datasets

ROWS_AT_ONCE = 256


def data_fingerprint(splits: datasets.DatasetDict) -> dict[str, dict[str, Any]]:
    return {name: split_fingerprint(split) for name, split in splits.items()}


def split_fingerprint(split: datasets.Dataset) -> dict[str, Any]:
    digest = hashlib.sha256()
    # The rows as stored: without a transform (the built-in set's stand-in pictures are drawn from a row's
    # image_name, which is hashed) and without decoding any image.
    for batch in split.with_format("arrow").iter(batch_size=ROWS_AT_ONCE):
        for row in batch.to_pylist():
            digest.update(json.dumps(_hashable(row), sort_keys=True, default=str).encode() + b"\n")
    return {"rows": len(split), "sha256": digest.hexdigest()}


def _hashable(value: Any) -> Any:
    """`value` with every image (Arrow's {bytes, path}) and every bytes value replaced by the hash of its bytes."""
    if isinstance(value, dict) and set(value) == {"bytes", "path"}:
        data = value["bytes"] if value["bytes"] is not None else \
            Path(value["path"]).read_bytes() if value["path"] is not None else None
        return None if data is None else hashlib.sha256(data).hexdigest()
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, dict):
        return {key: _hashable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_hashable(item) for item in value]
    return value


def changed_split(recorded: Any, now: dict[str, dict[str, Any]]) -> str | None:
    """The sentence's middle naming the first split of `now` that is not the one `recorded` (a checkpoint's
    fingerprint) describes, or None when every split is the same."""
    recorded = recorded if isinstance(recorded, dict) else {}
    for name, split in now.items():
        then = recorded.get(name)
        if then == split:
            continue
        if not isinstance(then, dict):
            return f"it holds no record of the {name!r} split it was trained on"
        if then.get("rows") != split["rows"]:
            return f"its {name!r} split had {then.get('rows')} rows, the data set's has {split['rows']} now"
        return f"its {name!r} split had the same {split['rows']} rows, with other contents than the data set's now"
    return None
