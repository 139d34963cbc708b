"""Load a train/validation/test data set from any of the places a user may keep one, and check it.

Sources: "musequest" (the real MuseQuest text shipped in the package, with stand-in images), a
folder written by `DatasetDict.save_to_disk`, an imagefolder (`<split>/metadata.csv` naming the
image files, which is how MuseQuest was built), or a Hugging Face hub id. Every row's dialog is
checked at load, text only, so a bad data set fails before a model is loaded, not mid-run.
"""

import contextlib
import json
from functools import partial
from pathlib import Path

import datasets
import pandas as pd
import pyarrow.compute as pc

from engine.config import HUB_ID
from engine.data.standin_images import standin_image
from errors import UsageError

SPLITS = ("train", "validation", "test")
COLUMNS = ("image", "data_id", "item_name", "image_name", "dialog")
MUSEQUEST_DIR = Path(__file__).parent / "musequest"


_LOADED: dict[tuple, datasets.DatasetDict] = {}  # this process's data sets, the last few, by source as it is on disk


def load_splits(source: str, *, limit_exhibits: int | None = None, image_size: int = 224) -> datasets.DatasetDict:
    """The three splits of `source`; with `limit_exhibits=K`, only rows of the first K item names (sorted).
    Read and checked once per process while the files stay as they are: the planner, the data checks,
    training and evaluation share one copy (which nobody changes: a Dataset's methods return new ones)."""
    key = (source, limit_exhibits, image_size, _as_on_disk(source))
    if key not in _LOADED:
        if len(_LOADED) >= 4:
            del _LOADED[next(iter(_LOADED))]
        _LOADED[key] = _read_splits(source, limit_exhibits=limit_exhibits, image_size=image_size)
    return _LOADED[key]


def _as_on_disk(source: str) -> tuple:
    """Every file of a local source with its size and modification time: a data set edited in place is read
    again."""
    folder = Path(source)
    if source == "musequest" or not folder.exists():
        return ()
    files = [folder] if folder.is_file() else sorted(path for path in folder.rglob("*") if path.is_file())
    return tuple((str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files)


def _read_splits(source: str, *, limit_exhibits: int | None, image_size: int) -> datasets.DatasetDict:
    if source == "musequest":
        splits = _musequest()
        _validate(splits, images_per_row={name: [1] * len(split) for name, split in splits.items()},
                  columns={name: [*split.column_names, "image"] for name, split in splits.items()})
    else:
        splits = _load(source)
        _validate(splits, images_per_row={name: _images_per_row(split) for name, split in splits.items()},
                  columns={name: split.column_names for name, split in splits.items()})
    splits = datasets.DatasetDict({name: splits[name] for name in SPLITS})
    if limit_exhibits is not None:
        splits = _first_exhibits(splits, limit_exhibits)
        for name, split in splits.items():
            if len(split) == 0:
                raise UsageError(f"--limit-exhibits {limit_exhibits} leaves the {name!r} split empty (none of its "
                                 "rows shows one of those exhibits); keep more exhibits.")
    if source == "musequest":
        # Pictures are drawn when a row is read, so loading costs no image work at all; a partial,
        # not a lambda, so the splits still pickle into spawned worker processes.
        splits.set_transform(partial(_with_standin_images, size=image_size))
    return splits


def _musequest() -> datasets.DatasetDict:
    return datasets.DatasetDict({
        name: datasets.Dataset.from_pandas(pd.read_csv(MUSEQUEST_DIR / name / "metadata.csv", keep_default_na=False))
        for name in SPLITS
    })


def _with_standin_images(batch: dict[str, list], size: int) -> dict[str, list]:
    return {**batch, "image": [standin_image(name, size) for name in batch["image_name"]]}


def _load(source: str) -> datasets.DatasetDict:
    folder = Path(source)
    if (folder / "dataset_dict.json").is_file():
        for name in SPLITS:
            if _saved_without_rows(folder / name / "state.json"):  # load_from_disk fails on it with an IndexError
                raise _empty_split(name)
        with _quiet():
            return datasets.load_from_disk(str(folder))
    if (folder / "train" / "metadata.csv").is_file():
        for name in SPLITS:
            if (folder / name / "metadata.csv").is_file():
                _check_metadata(folder / name / "metadata.csv", name)
        with _quiet():
            return datasets.load_dataset("imagefolder", data_dir=str(folder))
    if folder.is_dir():
        raise UsageError(f"folder {source!r} is neither a save_to_disk data set (no dataset_dict.json) "
                         "nor an imagefolder (no train/metadata.csv).")
    if not HUB_ID.fullmatch(source):  # a path (./data, /srv/photos, a/b/c), which no hub id looks like
        raise UsageError(f"the data set folder {source!r} does not exist.")
    try:
        return datasets.load_dataset(source)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load dataset {source!r}: it is no local folder, and the Hugging Face hub could not "
                         f"give it ({error})") from error


@contextlib.contextmanager
def _quiet():
    """No progress bars while a local folder loads: a run's stderr keeps one bar (training's) and, on bad
    input, one sentence."""
    if datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def _empty_split(name: str) -> UsageError:
    return UsageError(f"the {name!r} split is empty; every split ({', '.join(SPLITS)}) needs at least one row.")


def _saved_without_rows(state: Path) -> bool:
    try:
        return json.loads(state.read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False  # no such split, or not a state file of this form: load_from_disk reports it


def _check_metadata(path: Path, split: str) -> None:
    """Refuse an imagefolder's metadata.csv that `load_dataset` would fail on with a traceback."""
    if path.stat().st_size == 0:
        raise UsageError(f"{str(path)!r} is empty (0 bytes); it needs a header row naming the columns and one row "
                         "per image.")
    try:
        table = pd.read_csv(path, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as error:  # pandas' ParserError and EmptyDataError are ValueErrors
        reason = " ".join(str(error).split())
        raise UsageError(f"{str(path)!r} cannot be parsed as CSV ({reason}).") from error
    if "file_name" not in table.columns:
        raise UsageError(f"{str(path)!r} has no file_name column naming each row's image file (it has "
                         f"{list(table.columns)}).")
    if len(table) == 0:
        raise UsageError(f"the {split!r} split is empty: {str(path)!r} has a header but no rows.")


def _images_per_row(split: datasets.Dataset) -> list[int]:
    """1 per row with an image, 0 where it is null, read from Arrow without decoding any picture."""
    if "image" not in split.column_names:
        return [0] * len(split)  # the column check reports this split
    return [0 if null else 1 for null in pc.is_null(split.with_format("arrow")["image"]).to_pylist()]


def _validate(splits: datasets.DatasetDict, images_per_row: dict[str, list[int]],
              columns: dict[str, list[str]]) -> None:
    for name in SPLITS:
        if name not in splits:
            raise UsageError(f"the data set has no {name!r} split (it has {sorted(splits)}).")
        if len(splits[name]) == 0:
            raise _empty_split(name)
        missing = [column for column in COLUMNS if column not in columns[name]]
        if missing:
            raise UsageError(f"the {name!r} split lacks the column(s) {missing}; every split needs {list(COLUMNS)}.")
        rows = zip(splits[name]["data_id"], splits[name]["dialog"], images_per_row[name], strict=True)
        for data_id, dialog, images in rows:
            problem = dialog_problem(dialog, images)
            if problem:
                raise UsageError(f"row data_id={data_id} of the {name!r} split: {problem}.")


def dialog_messages(dialog: str) -> list[dict]:
    """A row's dialog column (a JSON string) as its list of messages."""
    return json.loads(dialog)["messages"]


def dialog_problem(dialog: str, images: int) -> str | None:
    """What is wrong with a dialog JSON string for a row holding `images` images, or None."""
    try:
        messages = dialog_messages(dialog)
        roles = [message["role"] for message in messages]
        images_in_dialog = image_entries(messages)
    except (json.JSONDecodeError, TypeError, KeyError) as error:
        return f'the dialog is not JSON of the form {{"messages": [{{"role", "content": [...]}}]}} ({error!r})'
    if "assistant" not in roles:
        return "the dialog has no assistant turn to learn from"
    if images_in_dialog != images:
        return f"the dialog has {images_in_dialog} image entries but the row holds {images} image(s)"
    return None


def image_entries(messages: list[dict]) -> int:
    return sum(part["type"] == "image" for message in messages for part in message["content"])


def _first_exhibits(splits: datasets.DatasetDict, count: int) -> datasets.DatasetDict:
    names = sorted({name for split in splits.values() for name in split["item_name"]})
    keep = set(names[:count])
    return datasets.DatasetDict({
        split_name: split.select([i for i, name in enumerate(split["item_name"]) if name in keep])
        for split_name, split in splits.items()
    })
