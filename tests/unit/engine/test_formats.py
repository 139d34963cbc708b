"""The data formats of other tools (engine/data/formats.py), --split-by (engine/data/split.py), and rows with
several images, none, several turns and a system turn.

Every format is written by the test from the same four dialogs; each must give, split for split and token for
token, the batches that the same dialogs give in MuseQuest's own shape (a `dialog` JSON string and an `images`
list, the reference written out by hand below).
"""

import csv
import json
import re
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from engine.data.collate import Collator
from engine.data.sources import load_splits
from engine.data.split import held_out_splits
from errors import UsageError
from eval.results_csv import read_results
from tests.harness import assert_one_sentence, run_cli, run_engine

PHOTOS = {"vase-1.png": (200, 30, 30), "vase-2.png": (30, 200, 30), "helmet.png": (30, 30, 200),
          "kimono.png": (200, 200, 30), "fan.png": (90, 40, 160)}
SYSTEM = "You are a museum guide."


def text(value: str) -> dict:
    return {"type": "text", "text": value}


IMAGE = {"type": "image"}
# The four dialogs in MuseQuest's shape: (item_name, messages, images). Two photos in one turn with a system
# turn and a second question; one photo; no photo at all; and a photo in the second turn only.
DIALOGS = [
    ("vase", [{"role": "system", "content": [text(SYSTEM)]},
              {"role": "user", "content": [IMAGE, IMAGE, text("What is this?")]},
              {"role": "assistant", "content": [text("A vase.")]},
              {"role": "user", "content": [text("How old is it?")]},
              {"role": "assistant", "content": [text("About 2,000 years.")]}], ["vase-1.png", "vase-2.png"]),
    ("helmet", [{"role": "user", "content": [IMAGE, text("What is this?")]},
                {"role": "assistant", "content": [text("A helmet.")]}], ["helmet.png"]),
    ("kimono", [{"role": "user", "content": [text("What is a kimono?")]},
                {"role": "assistant", "content": [text("A Japanese robe.")]}], []),
    ("fan", [{"role": "user", "content": [text("Hello.")]}, {"role": "assistant", "content": [text("Hello!")]},
             {"role": "user", "content": [IMAGE, text("And this?")]},
             {"role": "assistant", "content": [text("A folding fan.")]}], ["fan.png"]),
]


def photos(folder: Path) -> Path:
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    for name, colour in PHOTOS.items():
        Image.new("RGB", (40, 30), colour).save(folder / "photos" / name)
    return folder


def _string_content(message: dict) -> str:
    """A message's content as LLaMA-Factory writes it: one string, an <image> marker for each picture."""
    return "".join("<image>" if part["type"] == "image" else part["text"] for part in message["content"])


def trl_messages(folder: Path) -> str:
    """OpenAI / TRL messages in a JSONL file, each image part naming its picture; a string content where a turn
    holds text only."""
    lines = []
    for item, messages, images in DIALOGS:
        named = iter(images)
        turns = [{"role": m["role"], "content": [{"type": "image", "image": f"photos/{next(named)}"}
                                                 if part["type"] == "image" else part for part in m["content"]]
                  if any(part["type"] == "image" for part in m["content"]) else _string_content(m)}
                 for m in messages]
        lines.append(json.dumps({"messages": turns, "item_name": item}))
    (photos(folder) / "train.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "train.jsonl")


def trl_images_list(folder: Path) -> str:
    """TRL's other form, in a .json list: bare image parts and an `images` list beside the messages."""
    rows = [{"messages": messages, "images": [f"photos/{name}" for name in images], "item_name": item}
            for item, messages, images in DIALOGS]
    (photos(folder) / "train.json").write_text(json.dumps(rows))
    return str(folder / "train.json")


def _sharegpt_rows() -> list[dict]:
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"conversations": [{"from": roles[m["role"]], "value": _string_content(m)} for m in messages],
             "images": [f"photos/{name}" for name in images], "item_name": item}
            for item, messages, images in DIALOGS]


def sharegpt(folder: Path) -> str:
    """LLaMA-Factory's ShareGPT: from / value with <image> markers, and `images`."""
    (photos(folder) / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _sharegpt_rows()))
    return str(folder / "data.jsonl")


def imagefolder_jsonl(folder: Path) -> str:
    """A folder with metadata.jsonl: question and answer for the one-photo row (its photo in file_name) and the
    text-only one, ShareGPT for the rest."""
    simple = {"helmet": {"file_name": "photos/helmet.png", "question": "What is this?", "answer": "A helmet."},
              "kimono": {"question": "What is a kimono?", "answer": "A Japanese robe."}}
    rows = [{**simple[row["item_name"]], "item_name": row["item_name"]} if row["item_name"] in simple else row
            for row in _sharegpt_rows()]
    (photos(folder) / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder)


def imagefolder_csv(folder: Path) -> str:
    """A folder with metadata.csv: the dialogs as MuseQuest's JSON string, the photos in file_name columns."""
    with open(photos(folder) / "metadata.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["item_name", "file_name", "second_file_name", "dialog"])
        for item, messages, images in DIALOGS:
            names = [f"photos/{name}" for name in images] + ["", ""]
            writer.writerow([item, names[0], names[1], json.dumps({"messages": messages})])
    return str(folder)


def saved_trl(folder: Path) -> str:
    """A save_to_disk data set as TRL keeps one: a `messages` column of parts (Arrow gives every part both keys),
    the pictures in an `images` column."""
    photos(folder.parent)
    rows = [{"messages": [{"role": m["role"], "content": [{"type": p["type"], "text": p.get("text")}
                                                          for p in m["content"]]} for m in messages],
             "images": [Image.open(folder.parent / "photos" / name) for name in images], "item_name": item}
            for item, messages, images in DIALOGS]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    return str(folder)


def musequest_shape(folder: Path) -> datasets.Dataset:
    """The reference: the same dialogs in MuseQuest's shape, with an `images` list."""
    photos(folder)
    rows = [{"data_id": str(number), "item_name": item, "image_name": "; ".join(images),
             "dialog": json.dumps({"messages": messages}),
             "images": [str(folder / "photos" / name) for name in images]}
            for number, (item, messages, images) in enumerate(DIALOGS)]
    features = datasets.Features({"data_id": datasets.Value("string"), "item_name": datasets.Value("string"),
                                  "image_name": datasets.Value("string"), "dialog": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image())})
    return datasets.Dataset.from_list(rows, features=features)


FORMATS = {"trl messages (.jsonl)": trl_messages, "trl images list (.json)": trl_images_list,
           "sharegpt (.jsonl)": sharegpt, "imagefolder metadata.jsonl": imagefolder_jsonl,
           "imagefolder metadata.csv": imagefolder_csv}


@pytest.mark.parametrize("form", [*FORMATS, "save_to_disk, trl columns"])
def test_every_format_gives_the_rows_of_musequests_shape_token_for_token(form, tmp_path, processor):
    source = saved_trl(tmp_path / "saved") if form.startswith("save_to_disk") else FORMATS[form](tmp_path / "set")
    splits = load_splits(source, split_by="item_name", held_out=(0.25, 0.25))
    reference = held_out_splits(datasets.DatasetDict({"train": musequest_shape(tmp_path / "reference")}),
                                "item_name", (0.25, 0.25), "reference")
    collate = Collator(processor)
    for name, split in splits.items():
        assert split["item_name"] == reference[name]["item_name"], name
        for got, expected in zip(split, reference[name], strict=True):
            batch, wanted = collate([got]), collate([expected])
            assert batch.keys() == wanted.keys(), (name, got["item_name"])
            for key in wanted:
                assert torch.equal(batch[key], wanted[key]), (name, got["item_name"], key)


def test_the_reference_batches_hold_what_the_dialogs_say(tmp_path, processor):
    """What the comparison above stands on, worked out from the dialogs: every answer labelled (the system turn
    and the questions not), two pictures for the vase, none for the text-only row, the fan's after its first
    answer."""
    reference = musequest_shape(tmp_path)
    collate, decode = Collator(processor), processor.tokenizer.decode
    # (an answer after a special token starts with "▁", which decodes as a space)
    answers = {"vase": "A vase.<end_of_utterance> About 2,000 years.<end_of_utterance>",
               "helmet": "A helmet.<end_of_utterance>", "kimono": "A Japanese robe.<end_of_utterance>",
               "fan": "Hello!<end_of_utterance> A folding fan.<end_of_utterance>"}
    pictures = {"vase": 2, "helmet": 1, "kimono": 0, "fan": 1}
    for row in reference:
        batch = collate([row])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        assert decode(ids[labels != -100]) == answers[row["item_name"]], row["item_name"]
        shown_pictures = batch["pixel_values"].shape[1] if "pixel_values" in batch else 0
        assert shown_pictures == pictures[row["item_name"]], row["item_name"]
        shown = decode(ids)
        assert shown.count("<fake_token_around_image><image>") == pictures[row["item_name"]]
        assert (SYSTEM in shown) == (row["item_name"] == "vase")
        if row["item_name"] == "fan":
            assert shown.index("<image>") > shown.index("Hello!")


# --- bad input: one sentence naming the file, the line and the field ---------------------------------------------

GOOD = {"messages": [{"role": "user", "content": [{"type": "image", "image": "photos/fan.png"}, text("What?")]},
                     {"role": "assistant", "content": "A fan."}]}


def _with_user(content: object, role: str = "user", answer: bool = True) -> dict:
    return {"messages": [{"role": role, "content": content}] + ([{"role": "assistant", "content": "It."}] * answer)}


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', "line 2 is not JSON (Expecting value at character 14)."),
    (_with_user("Hi", role="bot"), "line 2: message 1 of its 'messages' has the role 'bot'; roles are user, "
                                   "assistant and system (ShareGPT's human and gpt too)."),
    (_with_user([{"type": "video", "video": "a.mp4"}]),
     "line 2: message 1 of its 'messages', part 1 has the type 'video'; parts are 'text', 'image' or 'image_url'."),
    ({"conversations": [{"from": "human", "value": "<image><image>Both?"}, {"from": "gpt", "value": "Yes."}],
      "images": ["photos/fan.png"]},
     "line 2: its dialog has 2 image part(s) or <image> marker(s) but 1 image(s) are given."),
    (_with_user([{"type": "image", "image": "../elsewhere/gone.png"}, text("What?")]),
     "line 2: the image '../elsewhere/gone.png' does not exist (looked for "),
    (_with_user([{"type": "image_url", "image_url": {"url": "https://example.org/fan.png"}}, text("What?")]),
     "line 2: the image 'https://example.org/fan.png' is a URL, which was not fetched (this engine reads images "
     "from files); download it and give its path."),
    (_with_user("Hello?", answer=False), "line 2: its dialog has no assistant turn to learn from."),
    ({"prompt": "Hi", "completion": "Hello"}, "line 2: no dialog found; a row needs one of the fields"),
])
def test_a_bad_row_is_one_sentence_naming_its_file_line_and_field(line, message, tmp_path):
    path = photos(tmp_path) / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(UsageError) as caught:
        load_splits(str(path), split_by="row")
    assert str(caught.value).startswith(f"{path} {message}"), str(caught.value)
    assert "\n" not in str(caught.value) and str(caught.value).endswith(".")


# --- --split-by ------------------------------------------------------------------------------------------------------

def exhibits(folder: Path, items: int, photos_each: int = 3, shuffled: bool = False) -> str:
    """`items` exhibits with `photos_each` text-only rows each, in a JSONL file (the row order reversed if
    `shuffled`)."""
    rows = [{"question": f"Photo {photo} of?", "answer": f"Exhibit {item}.", "item_name": f"exhibit-{item}",
             "room": f"room-{item % 2}"} for item in range(items) for photo in range(photos_each)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:: -1 if shuffled else 1]))
    return str(folder / "rows.jsonl")


def test_split_by_keeps_each_exhibit_in_one_split_in_the_fractions_asked_whatever_the_row_order(tmp_path):
    splits = load_splits(exhibits(tmp_path / "a", 10), split_by="item_name", held_out=(0.2, 0.3))
    items = {name: set(split["item_name"]) for name, split in splits.items()}
    assert {name: len(names) for name, names in items.items()} == {"train": 5, "validation": 2, "test": 3}
    assert {name: len(split) for name, split in splits.items()} == {"train": 15, "validation": 6, "test": 9}
    assert set.union(*items.values()) == {f"exhibit-{item}" for item in range(10)}
    reversed_rows = load_splits(exhibits(tmp_path / "b", 10, shuffled=True), split_by="item_name", held_out=(0.2, 0.3))
    assert {name: set(split["item_name"]) for name, split in reversed_rows.items()} == items
    by_row = load_splits(exhibits(tmp_path / "a", 10), split_by="row", held_out=(0.2, 0.3))
    assert {name: len(split) for name, split in by_row.items()} == {"train": 15, "validation": 6, "test": 9}
    splits_of = {}  # by row, some exhibit has photos in two splits, which --split-by item_name never allows
    for name, split in by_row.items():
        for item in split["item_name"]:
            splits_of.setdefault(item, set()).add(name)
    assert max(len(names) for names in splits_of.values()) > 1


@pytest.mark.parametrize("source, split_by, message", [
    ("rows", None, "'{path}' has a train split only; pass --split-by COLUMN (the column whose rows stay in one "
                   "split, e.g. item_name,"),
    ("rows", "exhibit", "--split-by exhibit: '{path}' has no column 'exhibit' (it has ["),
    ("rows", "room", "--split-by room: '{path}' has 2 distinct values of 'room', too few for 1 in the test split, 1 "
                     "in the validation split and at least one left to train on."),
    ("musequest", "item_name", "--split-by item_name: 'musequest' has its own test and validation split(s); "
                               "--split-by cuts validation and test splits from a data set with a train split only."),
])
def test_split_by_refusals(source, split_by, message, tmp_path):
    path = exhibits(tmp_path, 4) if source == "rows" else source
    with pytest.raises(UsageError, match="^" + re.escape(message.format(path=path))):
        load_splits(path, split_by=split_by)


def test_split_by_on_a_data_set_with_its_own_splits_is_refused(tmp_path):
    folder = photos(tmp_path)
    for name in ("train", "validation", "test"):
        (folder / name).mkdir()
        (folder / name / "metadata.jsonl").write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n")
    with pytest.raises(UsageError, match="^--split-by item_name: .* has its own test and validation split"):
        load_splits(str(folder), split_by="item_name")
    assert {name: len(split) for name, split in load_splits(str(folder)).items()} == \
        {"train": 1, "validation": 1, "test": 1}


# --- end to end: training, evaluation and `ask` on a user's own data -------------------------------------------------

HELD_OUT = dict(split_by="item_name", validation_fraction=0.25, test_fraction=0.25)


def _trained(out: Path, dataset: str, **overrides) -> dict:
    return run_engine(out, "lora", batch_size=2, gpus=None, dataset=dataset, limit_exhibits=None, max_steps=2,
                      **{**HELD_OUT, **overrides})


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference")
    saved = root / "saved"
    datasets.DatasetDict({"train": musequest_shape(root)}).save_to_disk(str(saved))
    return _trained(root / "out", str(saved))


@pytest.mark.slow  # a run of the engine per format
@pytest.mark.parametrize("form", [*FORMATS, "save_to_disk, trl columns"])
def test_every_format_trains_as_musequests_shape_does(form, reference_run, tmp_path):
    """The same losses, step for step, as the same dialogs in MuseQuest's shape; the splits written to
    OUT/splits.json are the ones --split-by cut."""
    source = saved_trl(tmp_path / "saved") if form.startswith("save_to_disk") else FORMATS[form](tmp_path / "set")
    summary = _trained(tmp_path / "out", source)
    assert summary["history"] == reference_run["history"]
    written = json.loads((tmp_path / "out" / "splits.json").read_text())
    cut = load_splits(source, split_by="item_name", held_out=(0.25, 0.25))
    assert written == {name: split["data_id"] for name, split in cut.items()}
    assert {name: len(ids) for name, ids in written.items()} == {"train": 2, "validation": 1, "test": 1}


@pytest.mark.slow  # a run of the engine, its evaluation and `run.py ask`
def test_rows_with_two_photos_none_and_several_turns_train_evaluate_and_ask(tmp_path):
    """An imagefolder with its own three splits (metadata.jsonl in each): the test split asks about two photos
    at once, about none, and a second question after a system turn. Every test row is answered and scored, and
    `ask` with the same two photos (`--image` twice) answers as the evaluation did."""
    folder = photos(tmp_path / "set")
    two_photos = {"conversations": [{"from": "human", "value": "<image><image>What is this?"},
                                    {"from": "gpt", "value": "A vase."}],
                  "images": ["../photos/vase-1.png", "../photos/vase-2.png"], "item_name": "vase"}
    rows = {"train": [{**row, "images": [f"../{path}" for path in row["images"]]} for row in _sharegpt_rows()],
            "validation": [{"file_name": "../photos/helmet.png", "question": "What?", "answer": "A helmet."}],
            "test": [two_photos, *({**row, "images": [f"../{path}" for path in row["images"]]}
                                   for row in _sharegpt_rows() if row["item_name"] in ("vase", "kimono"))]}
    for name, records in rows.items():
        (folder / name).mkdir()
        (folder / name / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    out = tmp_path / "out"
    run_engine(out, "lora", batch_size=2, gpus=None, dataset=str(folder), limit_exhibits=None, max_steps=2,
               skip_eval=False, max_new_tokens=4)
    answered = read_results(out / "eval" / "results.csv")
    assert sorted(row["user_question"] for row in answered) == ["How old is it?", "What is a kimono?", "What is this?"]
    assert all(row["model_generated_answer"] for row in answered)
    [two] = [row for row in answered if row["user_question"] == "What is this?"]
    result = run_cli("ask", "--adapter", str(out / "final"), "--image", str(folder / "photos" / "vase-1.png"),
                     "--image", str(folder / "photos" / "vase-2.png"), "--max-new-tokens", "4", "--device", "cpu",
                     "What is this?", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == two["model_generated_answer"] + "\n"


def test_a_bad_data_file_stops_a_run_in_one_sentence_before_anything_is_written(tmp_path):
    path = photos(tmp_path) / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(_with_user("Hi", role="bot")) + "\n")
    result = run_cli("--dataset", str(path), "--split-by", "row", "--model", "tiny", "--device", "cpu",
                     "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_sentence(result, f"error: {path} line 2: message 1 of its 'messages' has the role 'bot'")
    assert not (tmp_path / "out").exists()
