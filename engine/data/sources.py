"""Load a train/validation/test data set from any of the places a user may keep one, and check it.

Sources: "musequest" (the real MuseQuest text shipped in the package, with stand-in images); a
JSON or JSONL file of dialogs, or a folder of them with images (an imagefolder: `metadata.jsonl` or
`metadata.csv` on top, or in `train/`, `validation/`, `test/`); a folder written by
`DatasetDict.save_to_disk`; or a Hugging Face hub id. Dialogs may come in the shapes of TRL,
ShareGPT, the_cauldron or MuseQuest (engine/data/formats.py reads them all into MuseQuest's). A
source with a train split only gets its validation and test splits by `--split-by` (split.py).
Every row's dialog is checked at load, text only, so a bad data set fails before a model is loaded,
not mid-run.
"""
import contextlib
import json
from functools import partial
from pathlib import Path

import datasets
import pandas as pd
import pyarrow.compute as pc

from engine.config import HUB_ID, TrainConfig
from engine.data.formats import DIALOG_FIELDS, engine_messages, engine_row, file_rows
from engine.data.split import held_out_splits
from engine.data.standin_images import standin_image
from errors import UsageError

SPLITS = ("train", "validation", "test")
COLUMNS = ("data_id", "item_name", "image_name", "dialog")  # and the pictures: `images` (a list) or `image` (one)
IMAGE_COLUMNS = ("images", "image")
DATA_FILES = (".jsonl", ".json")
METADATA = ("metadata.jsonl", "metadata.csv")  # an imagefolder's, as `datasets` names them
ENGINE_FEATURES = datasets.Features({"data_id": datasets.Value("string"), "item_name": datasets.Value("string"),
                                     "image_name": datasets.Value("string"), "dialog": datasets.Value("string"),
                                     "images": datasets.List(datasets.Image())})
MUSEQUEST_DIR = Path(__file__).parent / "musequest"


_LOADED: dict[tuple, datasets.DatasetDict] = {}  # this process's data sets, the last few, by source as it is on disk


def load_splits(source: str, *, limit_exhibits: int | None = None, split_by: str | None = None,
                held_out: tuple[float, float] = (0.1, 0.1), image_size: int = 224) -> datasets.DatasetDict:
    """The three splits of `source`; with `limit_exhibits=K`, only rows of the first K item names (sorted); a
    train-only source cut by `split_by` into train, validation and test (`held_out`: their fractions).
    Read and checked once per process while the files stay as they are: the planner, the data checks,
    training and evaluation share one copy (which nobody changes: a Dataset's methods return new ones)."""
    key = (source, limit_exhibits, split_by, held_out, image_size, _as_on_disk(source))
    if key not in _LOADED:
        if len(_LOADED) >= 4:
            del _LOADED[next(iter(_LOADED))]
        _LOADED[key] = _read_splits(source, limit_exhibits=limit_exhibits, split_by=split_by, held_out=held_out,
                                    image_size=image_size)
    return _LOADED[key]


def data_settings(config: TrainConfig) -> dict:
    """`load_splits`' arguments for a run: its data set, as training, the planner and evaluation read it."""
    return dict(source=config.dataset, limit_exhibits=config.limit_exhibits, split_by=config.split_by,
                held_out=(config.validation_fraction, config.test_fraction))


def _as_on_disk(source: str) -> tuple:
    """Every file of a local source with its size and modification time: a data set edited in place is read
    again."""
    folder = Path(source)
    if source == "musequest" or not folder.exists():
        return ()
    files = [folder] if folder.is_file() else sorted(path for path in folder.rglob("*") if path.is_file())
    return tuple((str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files)


def _read_splits(source: str, *, limit_exhibits: int | None, split_by: str | None, held_out: tuple[float, float],
                 image_size: int) -> datasets.DatasetDict:
    if source == "musequest":
        splits = held_out_splits(_musequest(), split_by, held_out, source)  # (refuses a --split-by)
        _validate(splits, images_per_row={name: [1] * len(split) for name, split in splits.items()},
                  columns={name: [*split.column_names, "image"] for name, split in splits.items()})
    else:
        splits = held_out_splits(_load(source), split_by, held_out, source)
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
    path = Path(source)
    if path.is_file():
        if path.suffix not in DATA_FILES:
            raise UsageError(f"{source!r} is a file but not a data file: --dataset takes a .jsonl or .json file of "
                             "dialogs, a folder, 'musequest' or a Hugging Face id.")
        return datasets.DatasetDict({"train": _rows_dataset(file_rows(path))})
    if (path / "dataset_dict.json").is_file():
        for name in SPLITS:
            if _saved_without_rows(path / name / "state.json"):  # load_from_disk fails on it with an IndexError
                raise _empty_split(name)
        with _quiet():
            return _engine_splits(datasets.load_from_disk(str(path)), source)
    on_top = _metadata(path)
    if on_top is not None:
        return datasets.DatasetDict({"train": _rows_dataset(file_rows(on_top))})
    per_split = {name: _metadata(path / name) for name in SPLITS if _metadata(path / name) is not None}
    if "train" in per_split:
        return datasets.DatasetDict({name: _rows_dataset(file_rows(metadata)) for name, metadata in per_split.items()})
    if path.is_dir():
        raise UsageError(f"folder {source!r} is neither a save_to_disk data set (no dataset_dict.json) nor an "
                         f"imagefolder (no {' or '.join(METADATA)}, on top or in train/).")
    if not HUB_ID.fullmatch(source):  # a path (./data, /srv/photos, a/b/c), which no hub id looks like
        raise UsageError(f"the data set folder {source!r} does not exist.")
    try:
        loaded = datasets.load_dataset(source)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load dataset {source!r}: it is no local folder, and the Hugging Face hub could not "
                         f"give it ({error})") from error
    return _engine_splits(loaded, source)


def _metadata(folder: Path) -> Path | None:
    """An imagefolder's metadata file in `folder`, checked where it is a CSV; None if it has none."""
    found = [folder / name for name in METADATA if (folder / name).is_file()]
    if len(found) > 1:
        raise UsageError(f"folder {str(folder)!r} holds both {' and '.join(METADATA)}; keep the one that describes "
                         "its images.")
    if found and found[0].suffix == ".csv":
        _check_metadata(found[0], folder.name)
    return found[0] if found else None


def _rows_dataset(rows: list[dict]) -> datasets.Dataset:
    """Engine rows (formats.py) as a Dataset whose images are read, and decoded, only when a row is."""
    extra = {key: datasets.Value("string") for row in rows for key in row if key not in ENGINE_FEATURES}
    features = datasets.Features({**ENGINE_FEATURES, **extra})
    return datasets.Dataset.from_list([{key: row.get(key) for key in features} for row in rows], features=features)


def _engine_splits(splits: datasets.DatasetDict, source: str) -> datasets.DatasetDict:
    """A saved or hub data set's splits, each with MuseQuest's columns: a split whose dialogs are in another
    tool's shape gets a `dialog` column made from them (and data_id, item_name, image_name where it lacks them);
    its pictures stay in their column, untouched."""
    return datasets.DatasetDict({name: _engine_split(split, name, source) for name, split in splits.items()})


def _engine_split(split: datasets.Dataset, name: str, source: str) -> datasets.Dataset:
    columns = split.column_names
    if "dialog" in columns or not any(field in columns for field in DIALOG_FIELDS):
        return split  # MuseQuest's shape, or none that is known: _validate names what it lacks
    text_columns = [column for column in columns if column not in IMAGE_COLUMNS]
    records = split.select_columns(text_columns).with_format("arrow")[:].to_pylist()  # no picture decoded
    counts = _images_per_row(split)
    rows = []
    for index, record in enumerate(records):
        where = f"row {index} of the {name!r} split of {source!r}"
        pictures = [None] * counts[index] if image_column(columns) else None
        messages, images = engine_messages(record, where, pictures)
        if any(image is not None for image in images):
            raise UsageError(f"{where}: its image parts name files; a saved or hub data set keeps its pictures in "
                             "an 'images' column.")
        rows.append(engine_row(record, str(index), messages, []))
    replaced = [column for column in (*DIALOG_FIELDS, "answer", *COLUMNS) if column in columns]
    split = split.remove_columns(replaced)
    for column in COLUMNS:
        split = split.add_column(column, [row[column] for row in rows])
    return split


def image_column(columns: list[str]) -> str | None:
    """Where a split keeps its pictures: `images` (a list a row), `image` (MuseQuest's one), or None."""
    return next((column for column in IMAGE_COLUMNS if column in columns), None)


def row_images(row: dict) -> list:
    """A row's pictures, in the order its dialog's image parts come."""
    if "images" in row:
        return list(row["images"] or [])
    return [] if row.get("image") is None else [row["image"]]


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
    """Each row's number of pictures, read from Arrow without decoding any."""
    column = image_column(split.column_names)
    if column is None:
        return [0] * len(split)
    stored = split.with_format("arrow")[column]
    if column == "image":
        return [0 if null else 1 for null in pc.is_null(stored).to_pylist()]
    return pc.fill_null(pc.list_value_length(stored), 0).to_pylist()


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
        rows = zip(column(splits[name], "data_id"), column(splits[name], "dialog"), images_per_row[name], strict=True)
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
    names = {split_name: column(split, "item_name") for split_name, split in splits.items()}
    keep = set(sorted({name for split in names.values() for name in split})[:count])
    return datasets.DatasetDict({
        split_name: split.select([i for i, name in enumerate(names[split_name]) if name in keep])
        for split_name, split in splits.items()
    })


def column(split: datasets.Dataset, name: str, indices: list[int] | None = None) -> list:
    """A column's values (of the rows at `indices`, or of all), read from Arrow as Python values: no transform runs,
    so no picture is drawn or decoded, and no row is formatted on its own, as datasets' column iterator does (0.1 s
    of musequest's 975 rows, a tenth of the reading that every process of a run does once)."""
    table = split.select_columns([name]).with_format("arrow")
    return (table[:] if indices is None else table[indices]).column(name).to_pylist()
