"""Validation and test splits cut from a data set that has a train split only (`--split-by COLUMN`).

Rows that share the column's value go to one split together: split by the exhibit, no photo of a
test exhibit is ever trained on, which a row-by-row split (`--split-by row`) cannot promise. The
column's distinct values are sorted and shuffled with a fixed seed, then the first `test_fraction`
of them (at least one) make the test split, the next `validation_fraction` (at least one) the
validation split, and the rest train: the same data and settings always give the same splits, on
every rank and in every later `run.py eval`, whatever order the rows come in.
"""

import random

import datasets

from errors import UsageError

SEED = 0
ROW = "row"  # --split-by row: every row a group of its own


def held_out_splits(splits: datasets.DatasetDict, split_by: str | None, held_out: tuple[float, float],
                    source: str) -> datasets.DatasetDict:
    """`splits` as they are where they have their own validation and test splits; else train, validation and
    test cut from the train split by `split_by`, with `held_out` = (validation_fraction, test_fraction)."""
    if set(splits) != {"train"}:
        if split_by is not None:
            others = " and ".join(sorted(set(splits) - {"train"}))
            raise UsageError(f"--split-by {split_by}: {source!r} has its own {others} split(s); --split-by cuts "
                             "validation and test splits from a data set with a train split only.")
        return splits
    if split_by is None:
        raise UsageError(f"{source!r} has a train split only; pass --split-by COLUMN (the column whose rows stay in "
                         "one split, e.g. item_name, so that the test split never shows an exhibit a training photo "
                         "showed) or --split-by row, to cut validation and test splits from it.")
    train = splits["train"]
    groups = _groups(train, split_by, source)
    order = sorted(set(groups))
    random.Random(SEED).shuffle(order)
    validation_fraction, test_fraction = held_out
    tests = max(1, round(len(order) * test_fraction))
    validations = max(1, round(len(order) * validation_fraction))
    if tests + validations >= len(order):
        raise UsageError(f"--split-by {split_by}: {source!r} has {len(order)} distinct {_what(split_by)}, too few for "
                         f"{tests} in the test split, {validations} in the validation split and at least one left to "
                         "train on.")
    where = {group: "test" for group in order[:tests]}
    where |= {group: "validation" for group in order[tests : tests + validations]}
    return datasets.DatasetDict({name: train.select([row for row, group in enumerate(groups)
                                                     if where.get(group, "train") == name])
                                 for name in ("train", "validation", "test")})


def _groups(train: datasets.Dataset, split_by: str, source: str) -> list[str]:
    if split_by == ROW:
        return [str(row) for row in range(len(train))]
    if split_by not in train.column_names:
        raise UsageError(f"--split-by {split_by}: {source!r} has no column {split_by!r} (it has "
                         f"{sorted(train.column_names)}).")
    # From Arrow: no transform runs and no picture is decoded.
    return [str(value) for value in train.select_columns([split_by]).with_format("arrow")[split_by].to_pylist()]


def _what(split_by: str) -> str:
    return "rows" if split_by == ROW else f"values of {split_by!r}"
