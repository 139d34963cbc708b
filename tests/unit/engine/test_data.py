"""The data layer: stand-in images, data set sources and their checks, and the collator's labels.

Expected token ids are written out by hand from the shipped tokenizer's vocabulary (the comment
beside each names its token) so that a collator that mislabels cannot agree with itself.
"""

import csv
import hashlib
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import from_approach
from engine.data.collate import Collator
from engine.data.fingerprint import changed_split, data_fingerprint
from engine.data.sources import MUSEQUEST_DIR, column, load_splits
from engine.data.standin_images import standin_image
from engine.runtime import Runtime
from errors import UsageError
from finetune import trained_run

BOS, FAKE, IMG, EOU, PAD, NEWLINE = 1, 32000, 32001, 32002, 32003, 13
X = -100  # ignored label
# "User:<image>Describe?<end_of_utterance>\n" with the image expanded to 4 <image> tokens
PROMPT = [BOS, 1247, 28747, FAKE, IMG, IMG, IMG, IMG, FAKE, 27984, 28804, EOU, NEWLINE]  # <s> ▁User : ... ▁Describe ?
ASSISTANT = [7226, 11143, 28747]  # Ass istant :
A_PLANE = [330, 8573, 28723]  # ▁A ▁plane .
HI_PROMPT = [BOS, 1247, 28747, FAKE, IMG, IMG, IMG, IMG, FAKE, 15359, EOU, NEWLINE]  # ... ▁Hi
A_DOT = [330, 28723]  # ▁A .
YEAR_TURN = [730, 28747, 7601, 28804, EOU, NEWLINE]  # User : ▁Year ? (no image: "User: Year?")
ANSWER_1903 = [28705, 28740, 28774, 28734, 28770]  # ▁ 1 9 0 3


def test_hand_written_ids_are_the_tokenizers(processor):
    tokens = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<pad>", "▁A", "▁plane", ".", "▁Hi"]
    assert processor.tokenizer.convert_tokens_to_ids(tokens) == [FAKE, IMG, EOU, PAD, 330, 8573, 28723, 15359]


def user(text: str, image: bool = True) -> dict:
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def row(*messages: dict, images: int = 1, data_id: int = 7) -> dict:
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    return {"data_id": data_id, "image": picture if images else None,
            "dialog": json.dumps({"messages": list(messages)})}


PLANE = row(user("Describe?"), assistant("A plane."))
HI = row(user("Hi"), assistant("A."))
TWO_TURNS = row(user("Describe?"), assistant("A plane."), user("Year?", image=False), assistant("1903"))


def test_labels_are_the_answer_and_its_end_of_utterance(processor):
    batch = Collator(processor)([PLANE])
    assert batch["input_ids"].tolist() == [PROMPT + ASSISTANT + A_PLANE + [EOU, NEWLINE]]
    assert batch["labels"].tolist() == [[X] * 16 + A_PLANE + [EOU, X]]
    assert batch["attention_mask"].tolist() == [[1] * 21]
    assert batch["pixel_values"].shape == (1, 1, 3, 56, 56)
    assert batch["pixel_attention_mask"].shape == (1, 1, 56, 56)


def test_every_assistant_turn_is_labelled(processor):
    batch = Collator(processor)([TWO_TURNS])
    first = PROMPT + ASSISTANT + A_PLANE + [EOU, NEWLINE]
    assert batch["input_ids"].tolist() == [first + YEAR_TURN + ASSISTANT + ANSWER_1903 + [EOU, NEWLINE]]
    assert batch["labels"].tolist() == [[X] * 16 + A_PLANE + [EOU, X] + [X] * 9 + ANSWER_1903 + [EOU, X]]


def test_short_rows_are_padded_on_the_left_with_the_pad_token(processor):
    assert processor.tokenizer.padding_side == "left"  # the shipped default
    processor.tokenizer.padding_side = "right"  # a caller's setting: the collator pads on the left all the same
    batch = Collator(processor)([PLANE, TWO_TURNS])
    assert batch["input_ids"].shape == (2, 37)
    assert batch["input_ids"][0].tolist() == [PAD] * 16 + PROMPT + ASSISTANT + A_PLANE + [EOU, NEWLINE]
    assert batch["attention_mask"][0].tolist() == [0] * 16 + [1] * 21
    assert batch["labels"][0].tolist() == [X] * 32 + A_PLANE + [EOU, X]
    assert batch["attention_mask"][1].tolist() == [1] * 37
    assert processor.tokenizer.pad_token_id == PAD
    assert processor.tokenizer.padding_side == "right"  # and it did not change the caller's setting


def test_truncation_cuts_the_answer_from_its_end(processor):
    batch = Collator(processor, max_length=19)([HI, PLANE])
    hi = HI_PROMPT + ASSISTANT + A_DOT + [EOU, NEWLINE]  # 19 tokens: fits untouched
    assert batch["input_ids"].tolist() == [hi, PROMPT + ASSISTANT + A_PLANE]
    assert batch["labels"].tolist() == [[X] * 15 + A_DOT + [EOU, X], [X] * 16 + A_PLANE]
    assert batch["attention_mask"].tolist() == [[1] * 19] * 2


def test_a_prompt_longer_than_max_length_is_refused_with_its_size(processor):
    with pytest.raises(UsageError, match="need 16 tokens.*max_length=16"):
        Collator(processor, max_length=16)([PLANE])


@pytest.mark.parametrize("bad, message", [
    (row(user("Describe?")), "no assistant turn"),
    (row(user("Describe?"), assistant("A plane."), images=0), "1 image entries but the row holds 0"),
    (row({"role": "user", "content": [{"type": "image"}, {"type": "image"}]}, assistant("Two.")), "2 image entries"),
])
def test_collator_refuses_bad_rows(processor, bad, message):
    with pytest.raises(UsageError, match=f"data_id=7: .*{message}"):
        Collator(processor)([PLANE, bad])


# --- stand-in images -------------------------------------------------------------------------


def thumbnail(name: str) -> np.ndarray:
    """8x8 block means: a distance on these compares compositions, not pixel-exact edges."""
    return np.asarray(standin_image(name), dtype=float).reshape(8, 28, 8, 28, 3).mean(axis=(1, 3))


def test_standin_images_are_byte_identical_everywhere():
    image = standin_image("1903-wright-flyer-1-aug9.jpg", 64)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.tobytes() == standin_image("1903-wright-flyer-1-aug9.jpg", 64).tobytes()
    # A golden digest: a change of numpy, Pillow or platform must not change the pictures.
    digest = hashlib.sha256(image.tobytes()).hexdigest()
    assert digest == "358124647e338b52f0b1106c90c84076a275c8fa14eae70bec7466ae6afd1304"


def test_a_standin_image_changed_by_its_reader_leaves_the_next_one_as_drawn():
    """Pictures are drawn once and kept: each call must still hand out an image of its own."""
    name = "kermit-frog-puppet-2-aug3.jpg"
    drawn = standin_image(name, 32).tobytes()
    changed = standin_image(name, 32)
    changed.paste((255, 0, 0), (0, 0, 32, 32))
    assert changed.tobytes() != drawn and standin_image(name, 32).tobytes() == drawn


def test_standin_images_look_like_their_exhibit():
    exhibits = ["1903-wright-flyer", "abraham-lincolns-coffee-cup", "1-decadrachm-syracuse-about-400-bce",
                "20-dollars-pattern-united-states-1879", "kermit-frog-puppet", "weathervane-teapot"]
    bases = {exhibit: thumbnail(f"{exhibit}-1.jpg") for exhibit in exhibits}
    for exhibit in exhibits:
        for variant in [f"{exhibit}-2.jpg", f"{exhibit}-3.jpg"] + [f"{exhibit}-1-aug{n}.jpg" for n in range(10)]:
            picture = thumbnail(variant)
            distances = {other: np.abs(picture - base).mean() for other, base in bases.items()}
            assert 0 < distances[exhibit] < min(d for other, d in distances.items() if other != exhibit), variant


# --- data sources ----------------------------------------------------------------------------


def musequest_rows(split: str) -> list[dict]:
    with open(MUSEQUEST_DIR / split / "metadata.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_builtin_musequest_has_the_real_row_counts_and_standin_images():
    splits = load_splits("musequest", image_size=56)
    assert {name: len(split) for name, split in splits.items()} == {"train": 819, "validation": 82, "test": 74}
    first = splits["train"][0]
    assert (first["data_id"], first["item_name"], first["image_name"]) == \
        (0, "1903-wright-flyer", "1903-wright-flyer-1-aug9.jpg")
    assert first["image"].tobytes() == standin_image("1903-wright-flyer-1-aug9.jpg", 56).tobytes()
    assert json.loads(first["dialog"])["messages"][1]["role"] == "assistant"


def test_limit_exhibits_keeps_the_first_item_names_in_sorted_order():
    splits = load_splits("musequest", limit_exhibits=2)
    first_two = {"1-decadrachm-syracuse-about-400-bce", "1903-wright-flyer"}  # "-" sorts before "9"
    for name, split in splits.items():
        expected = [int(r["data_id"]) for r in musequest_rows(name) if r["item_name"] in first_two]
        assert list(split["data_id"]) == expected and expected
        assert set(split["item_name"]) == first_two
        assert split[0]["image"].size == (224, 224)


def dialog(question: str, answer: str) -> str:
    return json.dumps({"messages": [user(question), assistant(answer)]})


COLOURS = {"train": [(255, 0, 0), (0, 255, 0)], "validation": [(0, 0, 255)], "test": [(9, 99, 199)]}


def imagefolder(folder: Path) -> str:
    """An imagefolder data set with one 32x24 picture per colour."""
    for split, colours in COLOURS.items():
        (folder / split).mkdir(parents=True)
        with open(folder / split / "metadata.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["data_id", "item_name", "image_name", "file_name", "dialog"])
            for i, colour in enumerate(colours):
                Image.new("RGB", (32, 24), colour).save(folder / split / f"thing-{i}.png")
                writer.writerow([i, "thing", f"thing-{i}.png", f"thing-{i}.png", dialog("Colour?", str(colour))])
    return str(folder)


def test_imagefolder_source(tmp_path):
    splits = load_splits(imagefolder(tmp_path))
    assert {name: len(split) for name, split in splits.items()} == {"train": 2, "validation": 1, "test": 1}
    for split, colours in COLOURS.items():
        for r in splits[split]:
            [image] = r["images"]
            assert image.size == (32, 24)
            assert image.convert("RGB").getpixel((5, 5)) == colours[int(r["data_id"])]
            assert json.loads(r["dialog"])["messages"][1]["content"][0]["text"] == str(colours[int(r["data_id"])])
            assert r["image_name"] == f"thing-{r['data_id']}.png"


def saved(folder: Path, drop_split: str | None = None, drop_column: str | None = None, **train_row) -> str:
    """A save_to_disk data set with one row per colour; `train_row` overrides train's first row."""
    splits = {}
    for split, colours in COLOURS.items():
        rows = [{"image": Image.new("RGB", (16, 16), colour), "data_id": i, "item_name": "thing",
                 "image_name": f"thing-{i}.png", "dialog": dialog("Colour?", str(colour))}
                for i, colour in enumerate(colours)]
        if split == "train":
            rows[0].update(train_row)
        features = datasets.Features({"image": datasets.Image(), "data_id": datasets.Value("int64"),
                                      "item_name": datasets.Value("string"), "image_name": datasets.Value("string"),
                                      "dialog": datasets.Value("string")})
        table = datasets.Dataset.from_list(rows, features=features)
        splits[split] = table.remove_columns(drop_column) if drop_column else table
    if drop_split:
        del splits[drop_split]
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return str(folder)


def test_save_to_disk_source(tmp_path):
    splits = load_splits(saved(tmp_path / "set"))
    assert {name: len(split) for name, split in splits.items()} == {"train": 2, "validation": 1, "test": 1}
    assert splits["train"][1]["image"].getpixel((3, 3)) == (0, 255, 0)
    assert splits["test"][0]["image_name"] == "thing-0.png"


def test_a_fingerprint_follows_rows_and_image_bytes_not_where_the_data_set_lies(tmp_path):
    first = data_fingerprint(load_splits(imagefolder(tmp_path / "photos")))
    assert {name: split["rows"] for name, split in first.items()} == {"train": 2, "validation": 1, "test": 1}
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "photos", moved)
    assert data_fingerprint(load_splits(str(moved))) == first
    Image.new("RGB", (32, 24), (254, 0, 0)).save(moved / "train" / "thing-0.png")  # one photo retouched
    retouched = data_fingerprint(load_splits(str(moved)))
    assert retouched["validation"] == first["validation"] and retouched["test"] == first["test"]
    assert changed_split(first, retouched) == \
        "its 'train' split had the same 2 rows, with other contents than the data set's now"

    stored = data_fingerprint(load_splits(saved(tmp_path / "saved")))
    assert data_fingerprint(load_splits(saved(tmp_path / "again"))) == stored
    answer = data_fingerprint(load_splits(saved(tmp_path / "answer", dialog=dialog("Colour?", "blue"))))
    assert changed_split(stored, answer) == \
        "its 'train' split had the same 2 rows, with other contents than the data set's now"
    assert changed_split(stored, stored) is None
    assert changed_split({**stored, "train": {"rows": 4, "sha256": "0"}}, stored) == \
        "its 'train' split had 4 rows, the data set's has 2 now"
    assert changed_split(None, stored) == "it holds no record of the 'train' split it was trained on"


def test_the_base_models_cached_score_is_keyed_by_the_test_rows_not_the_data_sets_path(tmp_path):
    """A test split edited in place gets the base model scored again; other splits' edits do not."""
    folder = Path(imagefolder(tmp_path / "photos"))
    config = from_approach("lora", dataset=str(folder), output_dir=str(tmp_path / "out")).resolved(gpu=False)
    runtime = Runtime(torch.device("cpu"))
    key = trained_run(config, runtime).baseline_key
    Image.new("RGB", (32, 24), (1, 2, 3)).save(folder / "train" / "thing-0.png")
    assert trained_run(config, runtime).baseline_key == key
    Image.new("RGB", (32, 24), (1, 2, 3)).save(folder / "test" / "thing-0.png")
    assert trained_run(config, runtime).baseline_key != key


def test_the_builtin_set_is_fingerprinted_by_its_rows_alone():
    """Its pictures are drawn from each row's image_name when read: hashing the rows covers them, with no
    picture drawn."""
    splits = load_splits("musequest", limit_exhibits=2)
    fingerprint = data_fingerprint(splits)
    assert {name: split["rows"] for name, split in fingerprint.items()} == {name: len(split) for name, split in
                                                                           splits.items()}
    assert len({split["sha256"] for split in fingerprint.values()}) == 3
    assert data_fingerprint(load_splits("musequest", limit_exhibits=3))["train"] != fingerprint["train"]


def test_hub_ids_fail_with_a_clear_message_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    with pytest.raises(UsageError, match="cannot load dataset 'x/y': it is no local folder, and the Hugging Face "
                                         "hub could not give it"):
        load_splits("x/y")


@pytest.mark.parametrize("path", ["./photos", "/srv/museum/photos", "data/museum/photos", "photos/"])
def test_a_mistyped_folder_is_named_as_a_folder_that_does_not_exist_not_as_a_hub_failure(path):
    with pytest.raises(UsageError, match=f"^the data set folder '{path}' does not exist.$"):
        load_splits(path)


def test_an_unknown_folder_is_refused(tmp_path):
    with pytest.raises(UsageError, match="neither a save_to_disk data set"):
        load_splits(str(tmp_path))


@pytest.mark.parametrize("problem, message", [
    (dict(drop_split="validation"), "no 'validation' split"),
    (dict(drop_column="dialog"), r"the 'train' split lacks the column\(s\) \['dialog'\]"),
    (dict(dialog="{not json"), "data_id=0 of the 'train' split: the dialog is not JSON"),
    (dict(dialog=json.dumps({"messages": [user("Hi?")]})), "data_id=0 of the 'train' split: .*no assistant turn"),
    (dict(dialog=json.dumps({"messages": [user("Hi?", image=False), assistant("Hi.")]})),
     "data_id=0 of the 'train' split: the dialog has 0 image entries but the row holds 1"),
    (dict(image=None), "data_id=0 of the 'train' split: the dialog has 1 image entries but the row holds 0"),
])
def test_bad_data_sets_are_refused_at_load(tmp_path, problem, message):
    with pytest.raises(UsageError, match=message):
        load_splits(saved(tmp_path / "set", **problem))


def test_a_column_read_from_arrow_is_the_selected_rows_values_and_draws_no_picture():
    """engine/data/sources.py `column`: the values datasets' own row formatting gives, of the rows a selection kept
    (not the table under it) and in its order, with the split's transform (musequest's drawn pictures) never run."""
    whole = load_splits("musequest")["train"].with_format(None)  # (a new object: the cached split stays as it is)
    rows = [400, 2, 7, 100, 3, 9]
    split = whole.select(rows)
    drawn = []
    split.set_transform(lambda batch: drawn.append(1) or batch)
    assert column(split, "data_id") == [whole[row]["data_id"] for row in rows] != whole["data_id"][:len(rows)]
    assert column(split, "item_name", [5, 0, 3]) == [whole[rows[i]]["item_name"] for i in (5, 0, 3)]
    assert not drawn
