"""Bad data is found before work: images that do not decode, empty splits, broken metadata.csv files and rows
longer than --max-length or the model's context each stop a run with one sentence, before the model loads.

The token counts the length check uses are held to the collator's own output, so the check can neither
refuse a row the run would take nor pass one it would refuse.
"""

import copy
import csv
import json
import time
from pathlib import Path

import datasets
import pytest
from PIL import Image

import engine.data.checks as data_checks
from engine.build import configure_processor
from engine.config import from_approach
from engine.data.checks import (
    answer_starts,
    check_data,
    check_images,
    check_lengths,
    check_special_tokens,
    row_lengths,
)
from engine.data.collate import Collator
from engine.data.sources import load_splits
from errors import UsageError
from harness import assert_one_sentence, run_cli, snapshot
from models.load import config_and_processor
from models.tiny import tiny_idefics3

COLUMNS = ["data_id", "item_name", "image_name", "file_name", "dialog"]


def dialog(question: str, answer: str, image: bool = True) -> str:
    return json.dumps({"messages": [
        {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})


def imagefolder(root: Path, rows: dict[str, int] | None = None, answers: dict | None = None) -> Path:
    """train/validation/test, each with `rows[split]` JPEG rows (2/1/1); `answers[(split, i)]` overrides an answer."""
    rows, answers = rows or {"train": 2, "validation": 1, "test": 1}, answers or {}
    for split, count in rows.items():
        (root / split).mkdir(parents=True)
        with open(root / split / "metadata.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(COLUMNS)
            for i in range(count):
                Image.new("RGB", (32, 24), (40 * i, 90, 200)).save(root / split / f"thing-{i}.jpg")
                writer.writerow([i, "thing", f"thing-{i}.jpg", f"thing-{i}.jpg",
                                 dialog("Colour?", answers.get((split, i), "Blue."))])
    return root


def checked(folder: Path) -> None:
    """load_splits, then the image checks, as a run does before its model loads."""
    splits = load_splits(str(folder))
    for name, split in splits.items():
        check_images(split, name)


# --- images ----------------------------------------------------------------------------------


def test_good_images_pass(tmp_path):
    checked(imagefolder(tmp_path / "set"))


def damage(how: str, path: Path) -> None:
    if how == "missing":
        path.unlink()
    elif how == "text":
        path.write_text("this is not a picture\n")
    else:  # truncated: the header and the first scan lines only
        path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize("how, problem", [
    ("missing", "does not exist"),
    ("text", "is not an image file Pillow can read (22 bytes)"),
    ("truncated", "is damaged and cannot be decoded"),
])
def test_a_bad_image_is_named_by_split_row_and_file(tmp_path, how, problem):
    folder = imagefolder(tmp_path / "set", rows={"train": 3, "validation": 1, "test": 1})
    damage(how, folder / "train" / "thing-2.jpg")
    path = folder.resolve() / "train" / "thing-2.jpg"
    with pytest.raises(UsageError) as caught:
        checked(folder)
    message = str(caught.value)
    if how == "missing":  # found as the metadata is read, named by its file and line (line 1: the header)
        expected = f"{folder / 'train' / 'metadata.csv'} line 4: the image 'thing-2.jpg' {problem}"
    else:
        expected = f"row 2 (data_id=2) of the 'train' split: its image {str(path)!r} {problem}"
    assert message.startswith(expected), message
    assert message.endswith(".") and "\n" not in message, message


def test_a_corrupt_image_stored_inside_a_save_to_disk_data_set_is_named(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "data_id": datasets.Value("int64"),
                                  "item_name": datasets.Value("string"), "image_name": datasets.Value("string"),
                                  "dialog": datasets.Value("string")})
    good = Image.new("RGB", (16, 16), (1, 2, 3))
    splits = {split: datasets.Dataset.from_list(
        [{"image": good, "data_id": i, "item_name": "thing", "image_name": f"t-{i}.png", "dialog": dialog("Q?", "A.")}
         for i in range(2)], features=features) for split in ("train", "validation", "test")}
    rows = splits["test"].to_list()
    rows[1]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": None}
    splits["test"] = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "set"))
    with pytest.raises(UsageError, match=r"^row 1 \(data_id=1\) of the 'test' split: its image is "
                                         r"(damaged|not an image)"):
        checked(tmp_path / "set")


def test_the_builtin_stand_in_pictures_are_not_read(monkeypatch):
    def fail(*args):
        raise AssertionError("the built-in stand-in images were checked")

    monkeypatch.setattr(data_checks, "check_images", fail)
    splits = load_splits("musequest", limit_exhibits=2)
    check_data(splits, from_approach("lora", model="tiny"), "tiny")


# --- splits and metadata.csv -----------------------------------------------------------------


def test_an_empty_imagefolder_split_is_named(tmp_path):
    folder = imagefolder(tmp_path / "set", rows={"train": 2, "validation": 0, "test": 1})
    path = folder / "validation" / "metadata.csv"
    with pytest.raises(UsageError) as caught:
        load_splits(str(folder))
    assert str(caught.value) == f"the 'validation' split is empty: {str(path)!r} has a header but no rows."


def test_an_empty_save_to_disk_split_is_named(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "data_id": datasets.Value("int64"),
                                  "item_name": datasets.Value("string"), "image_name": datasets.Value("string"),
                                  "dialog": datasets.Value("string")})
    row = {"image": Image.new("RGB", (8, 8)), "data_id": 0, "item_name": "thing", "image_name": "t.png",
           "dialog": dialog("Q?", "A.")}
    empty = datasets.Dataset.from_dict({column: [] for column in features}, features=features)
    datasets.DatasetDict({"train": datasets.Dataset.from_list([row], features=features),
                          "validation": datasets.Dataset.from_list([row], features=features),
                          "test": empty}).save_to_disk(str(tmp_path / "set"))
    with pytest.raises(UsageError, match=r"^the 'test' split is empty; every split \(train, validation, test\) "
                                         r"needs at least one row\.$"):
        load_splits(str(tmp_path / "set"))


def test_limit_exhibits_that_leaves_a_split_empty_is_refused(tmp_path):
    folder = imagefolder(tmp_path / "set")
    lines = (folder / "test" / "metadata.csv").read_text().replace(",thing,", ",another,")
    (folder / "test" / "metadata.csv").write_text(lines)  # "another" sorts first and is only in test
    with pytest.raises(UsageError, match=r"^--limit-exhibits 1 leaves the 'train' split empty"):
        load_splits(str(folder), limit_exhibits=1)


@pytest.mark.parametrize("text, message", [
    ("", "is empty (0 bytes); it needs a header row naming the columns and one row per image."),
    ('data_id,item_name,file_name\n1,"never closed\n', "cannot be parsed as CSV (Error tokenizing data."),
    ("data_id,item_name,dialog\n1,thing,{}\n", "has no file_name column naming each row's image file"),
])
def test_a_broken_metadata_csv_is_named(tmp_path, text, message):
    folder = imagefolder(tmp_path / "set")
    path = folder / "validation" / "metadata.csv"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        load_splits(str(folder))
    assert str(caught.value).startswith(f"{str(path)!r} {message}"), caught.value
    assert "\n" not in str(caught.value)


# --- lengths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("own", [False, True])  # Idefics2-8B's processor splits no image, Idefics3's does
def test_image_splitting_is_the_processors_own_unless_a_flag_says_otherwise(processor, own):
    for given, expected in ((None, own), (True, True), (False, False)):
        configured = copy.deepcopy(processor)
        configured.image_processor.do_image_splitting = own
        configure_processor(configured, from_approach("lora", image_splitting=given))
        assert configured.image_processor.do_image_splitting is expected, given


def test_a_split_image_gives_the_model_as_many_crops_as_image_tokens(processor, tiny_model):
    """Idefics2-8B's tokenizer_config.json holds do_image_splitting too, and transformers gives it precedence
    over the image processor's: the text counted 5 crops an image while the pixels held 1, and the forward
    failed ("Image features and image tokens do not match"). 5 crops of 4 tokens (the tiny perceiver's)."""
    splitting = copy.deepcopy(processor)
    configure_processor(splitting, from_approach("lora", image_splitting=True))
    row = load_splits("musequest", limit_exhibits=1)["train"][0]
    batch = Collator(splitting)([row])
    assert batch["pixel_values"].shape[1] == 5
    assert (batch["input_ids"] == splitting.tokenizer.convert_tokens_to_ids("<image>")).sum() == 5 * 4
    tiny_model(**{key: value for key, value in batch.items() if key != "labels"})  # the check above, the model's


def test_token_counts_are_the_collators(processor):
    splits = load_splits("musequest", limit_exhibits=1, image_size=56)
    rows = [{key: splits[name][i][key] for key in ("data_id", "image", "dialog")}
            for name in splits for i in range(min(4, len(splits[name])))]
    text_only = {"data_id": 99, "image": None, "dialog": json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hello there, what is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A plane."}]},
        {"role": "user", "content": [{"type": "text", "text": "When?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "In 1903, at Kitty Hawk."}]}]})}
    splitting = copy.deepcopy(processor)
    configure_processor(splitting, from_approach("lora", image_splitting=True))  # 5 runs of image tokens each
    for proc in (processor, splitting):
        table = datasets.Dataset.from_list(rows + [text_only], features=datasets.Features({
            "data_id": datasets.Value("int64"), "image": datasets.Image(), "dialog": datasets.Value("string")}))
        lengths = row_lengths(table, proc)
        for i, row in enumerate(rows + [text_only]):
            assert lengths[i] == Collator(proc)([row])["input_ids"].shape[1]
            start = answer_starts(table, [i], proc)[0]
            assert 0 < start < lengths[i]
            Collator(proc, max_length=start + 1)([row])  # one answer token left: taken
            with pytest.raises(UsageError, match=f"need {start} tokens"):
                Collator(proc, max_length=start)([row])  # none left: the collator refuses, as the check predicts
    assert row_lengths(table, splitting)[0] == row_lengths(table, processor)[0] + 4 * (4 + 1)


def test_token_counts_with_a_processor_that_needs_the_pictures():
    _, idefics3 = tiny_idefics3(0)
    images = [Image.new("RGB", (56, 56), (9, 9, 9)), Image.new("RGB", (112, 56), (9, 9, 9))]
    table = datasets.Dataset.from_list(
        [{"data_id": i, "image": image, "dialog": dialog("Colour?", "Grey, " * 5)} for i, image in enumerate(images)],
        features=datasets.Features({"data_id": datasets.Value("int64"), "image": datasets.Image(),
                                    "dialog": datasets.Value("string")}))
    lengths = row_lengths(table, idefics3)
    for i in range(len(table)):
        assert lengths[i] == Collator(idefics3)([table[i]])["input_ids"].shape[1]
        start = answer_starts(table, [i], idefics3)[0]
        with pytest.raises(UsageError, match=f"need {start} tokens"):
            Collator(idefics3, max_length=start)([table[i]])


@pytest.mark.parametrize("splitting", [False, True])
def test_the_check_reports_tokens_and_image_tokens_per_row(splitting):
    """The line a run prints after its data check: a row with two pictures, one with one and a text-only row hold
    8, 4 and 0 image tokens on the tiny model (4 per picture), five times that when each picture is split into four
    crops and the whole; the tokens per row are the collator's."""
    two = {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Both?"}]}
    picture = Image.new("RGB", (56, 56), (9, 90, 9))
    answer = {"role": "assistant", "content": [{"type": "text", "text": "Green and green."}]}
    rows = [{"data_id": 0, "images": [picture, picture], "dialog": json.dumps({"messages": [two, answer]})},
            {"data_id": 1, "images": [picture], "dialog": dialog("Colour?", "Green.")},
            {"data_id": 2, "images": [], "dialog": dialog("Hello?", "Hello.", image=False)}]
    table = datasets.Dataset.from_list(rows, features=datasets.Features({
        "data_id": datasets.Value("int64"), "images": datasets.List(datasets.Image()),
        "dialog": datasets.Value("string")}))
    splits = datasets.DatasetDict({"train": table, "validation": table.select([1]), "test": table.select([2])})
    config = from_approach("lora", model="tiny", image_splitting=splitting)
    line = check_data(splits, config, "tiny")
    processor = copy.deepcopy(config_and_processor("tiny")[1])
    configure_processor(processor, config)
    lengths = sorted(Collator(processor)([row])["input_ids"].shape[1] for split in splits.values() for row in split)
    per = 4 * (5 if splitting else 1)
    assert line == (f"data: train 3 rows, validation 1, test 1; tokens per row {lengths[0]} to {lengths[-1]} "
                    f"(median {lengths[2]}), image tokens per row 0 to {2 * per} (median {per})")


def long_splits(tmp_path: Path) -> datasets.DatasetDict:
    answers = {("validation", 1): "Blue, " * 30, ("train", 0): "Blue, " * 10}  # the longest is validation's row 1
    return load_splits(str(imagefolder(tmp_path / "set", rows={"train": 2, "validation": 2, "test": 1},
                                       answers=answers)))


def test_rows_longer_than_the_context_name_the_longest_and_the_flag(tmp_path, processor):
    splits = long_splits(tmp_path)
    lengths = {name: row_lengths(split, processor) for name, split in splits.items()}
    longest = lengths["validation"][1]
    assert longest == max(max(values) for values in lengths.values()) > lengths["train"][0] > 30
    check_lengths(splits, processor, None, longest)  # exactly the context: fits
    with pytest.raises(UsageError) as caught:
        check_lengths(splits, processor, None, 30)
    assert str(caught.value) == (f"2 rows of the data set need more tokens than the model's context of 30 "
                                 f"(max_position_embeddings), the longest being row 1 (data_id=1) of the "
                                 f"'validation' split with {longest} tokens; pass --max-length 30 to cut the answers "
                                 f"that do not fit.")
    check_lengths(splits, processor, 30, 30)  # cut to fit: taken
    with pytest.raises(UsageError, match=r"^row \d \(data_id=\d\) of the '\w+' split: its prompt and image tokens "
                                         r"need \d+ tokens before its last answer, leaving no room for the answer "
                                         r"within the model's context of 10 tokens; shorten that row's prompt\.$"):
        check_lengths(splits, processor, None, 10)  # no cut could help


def test_max_length_must_leave_room_for_an_answer(tmp_path, processor):
    splits = long_splits(tmp_path)
    start = answer_starts(splits["train"], [0], processor)[0]
    check_lengths(splits, processor, start + 1, 2048)
    with pytest.raises(UsageError) as caught:
        check_lengths(splits, processor, start, 2048)
    assert str(caught.value) == (f"row 0 (data_id=0) of the 'train' split: its prompt and image tokens need {start} "
                                 f"tokens before its last answer, leaving no room for the answer within "
                                 f"--max-length {start}; use --max-length {start + 1} or more.")


def test_max_length_beyond_the_context_is_refused_when_a_row_needs_it(tmp_path, processor):
    splits = long_splits(tmp_path)
    longest = row_lengths(splits["validation"], processor)[1]
    check_lengths(splits, processor, 4096, 2048)  # more than the context, but every row fits it
    with pytest.raises(UsageError, match=rf"^--max-length 100 is more than the model's context of 30 tokens, and 2 "
                                         rf"rows need more than 30 \(the longest, row 1 \(data_id=1\) of the "
                                         rf"'validation' split, {longest}\); use --max-length 30 or less\.$"):
        check_lengths(splits, processor, 100, 30)


def test_the_check_on_the_full_builtin_data_is_quick():
    splits = load_splits("musequest")
    started = time.perf_counter()
    check_data(splits, from_approach("lora", model="tiny"), "tiny")
    assert time.perf_counter() - started < 20  # about 1.5 s on 2 busy cores; a picture drawn per row would be far over


# --- the command line ------------------------------------------------------------------------


def refused(tmp_path: Path, folder: Path, *extra: str) -> tuple:
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(folder), snapshot(out)
    started = time.perf_counter()
    result = run_cli("--approach", "lora", "--model", "tiny", "--device", "cpu", "--dataset", str(folder),
                     "--output-dir", str(out), "--max-steps", "1", "--skip-eval", *extra, cwd=tmp_path)
    seconds = time.perf_counter() - started
    assert (snapshot(folder), snapshot(out)) == before
    assert not any(out.iterdir())  # no checkpoints, no base model: nothing ran
    return result, seconds


@pytest.mark.slow  # an end-to-end run
def test_cli_a_truncated_image_stops_the_run_before_the_model_loads(tmp_path):
    folder = imagefolder(tmp_path / "set")
    damage("truncated", folder / "validation" / "thing-0.jpg")
    result, seconds = refused(tmp_path, folder)
    assert_one_sentence(result, f"error: row 0 (data_id=0) of the 'validation' split: its image "
                                f"{str(folder / 'validation' / 'thing-0.jpg')!r} is damaged and cannot be decoded")
    assert seconds < 120, seconds


@pytest.mark.slow  # an end-to-end run
def test_cli_an_answer_longer_than_the_tiny_models_context_is_refused(tmp_path):
    folder = imagefolder(tmp_path / "set", answers={("test", 0): "Blue, " * 1100})  # about 2200 tokens
    result, seconds = refused(tmp_path, folder)
    assert_one_sentence(result, "error: 1 row of the data set needs more tokens than the model's context of 2048 "
                                "(max_position_embeddings), the longest being row 0 (data_id=0) of the 'test' split "
                                "with ")
    assert "pass --max-length 2048 to cut the answers that do not fit." in result.stderr
    assert seconds < 120, seconds


@pytest.mark.slow  # an end-to-end run
def test_a_run_reads_its_data_once_and_counts_each_row_once(tmp_path, monkeypatch):
    """A one-process run planned before it loads (--memory-budget) then trained and evaluated: the planner, the
    data checks, training and evaluation share one read of the data set, and each row's tokens are counted once
    (the planner's widest row and the data checks' lengths)."""
    import run
    from engine.data import sources

    reads, counted = [], []
    read, count = sources._read_splits, data_checks._count_rows
    monkeypatch.setattr(sources, "_read_splits", lambda *args, **kwargs: reads.append(args) or read(*args, **kwargs))
    monkeypatch.setattr(data_checks, "_count_rows",
                        lambda split, processor: counted.append(len(split)) or count(split, processor))
    sources._LOADED.clear()
    data_checks._COUNTS.clear()
    assert run.train_command(["--approach", "lora", "--model", "tiny", "--device", "cpu", "--limit-exhibits", "1",
                              "--max-steps", "1", "--batch-size", "1", "--max-new-tokens", "2",
                              "--memory-budget", "64", "--output-dir", str(tmp_path / "run")]) == 0
    splits = sources.load_splits("musequest", limit_exhibits=1)
    assert len(reads) == 1
    assert sorted(counted) == sorted(len(split) for split in splits.values())  # each split's rows, once


# --- special tokens --------------------------------------------------------------------------


def test_every_special_token_in_a_question_or_an_answer_is_named_by_split_and_row(tmp_path, processor):
    """Each of the tokenizer's added tokens (`<image>`, `<end_of_utterance>`, `<s>`, ...; Idefics3's `<global-img>`
    too), written literally in a question or an answer, is refused before the model loads; the same words without
    the brackets pass."""
    idefics3 = tiny_idefics3(0)[1]
    tokens = {token: processor for token in processor.tokenizer.get_added_vocab()}
    tokens |= {token: idefics3 for token in idefics3.tokenizer.get_added_vocab() if token not in tokens}
    assert {"<image>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>"} <= set(tokens)
    plain = load_splits(str(imagefolder(tmp_path / "plain", answers={("train", 1): "An image, an end of utterance."})))
    for name, split in plain.items():
        check_special_tokens(split, name, processor)
        check_special_tokens(split, name, idefics3)
    for number, (token, family) in enumerate(tokens.items()):
        where = ("test", 0) if number % 2 else ("train", 1)
        folder = imagefolder(tmp_path / f"set-{number}", answers={where: f"It shows {token} here."})
        splits = load_splits(str(folder))
        with pytest.raises(UsageError) as caught:
            for name, split in splits.items():
                check_special_tokens(split, name, family)
        assert str(caught.value) == (f"row {where[1]} (data_id={where[1]}) of the {where[0]!r} split: its text holds "
                                     f"{token!r}, which the tokenizer reads as one of the model's special tokens; "
                                     f"remove or reword it."), token
