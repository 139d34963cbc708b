"""`run.py data` (engine/data/audit.py): its counts against values worked out from the dialogs and the
tokenizer alone, its rendering of a row checked by hand, and what --max-length cuts and refuses."""

import json
from pathlib import Path

import pytest
from PIL import Image

from engine.data.audit import audit, histogram
from engine.data.sources import load_splits
from harness import run_cli

ANSWERS = {"vase": ["A vase.", "About 2,000 years."], "helmet": ["A helmet."], "kimono": ["A Japanese robe."]}


def dialogs(folder: Path) -> str:
    """Three exhibits in ShareGPT form: two photos and two answers, one photo, no photo; a train split only."""
    (folder / "photos").mkdir(parents=True)
    for name in ("vase-1", "vase-2", "helmet"):
        Image.new("RGB", (40, 30), (len(name) * 20, 90, 30)).save(folder / "photos" / f"{name}.png")
    rows = [{"conversations": [{"from": "human", "value": "<image><image>What is this?"},
                               {"from": "gpt", "value": ANSWERS["vase"][0]},
                               {"from": "human", "value": "How old is it?"},
                               {"from": "gpt", "value": ANSWERS["vase"][1]}],
             "images": ["photos/vase-1.png", "photos/vase-2.png"], "item_name": "vase", "data_id": "vase"},
            {"conversations": [{"from": "human", "value": "<image>What is this?"},
                               {"from": "gpt", "value": ANSWERS["helmet"][0]}],
             "images": ["photos/helmet.png"], "item_name": "helmet", "data_id": "helmet"},
            {"conversations": [{"from": "human", "value": "What is a kimono?"},
                               {"from": "gpt", "value": ANSWERS["kimono"][0]}], "item_name": "kimono",
             "data_id": "kimono"}]
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder / "data.jsonl")


def test_the_counts_are_the_dialogs_own(tmp_path, processor):
    """Loss tokens: each answer's tokens plus its end of utterance; image tokens: 4 a photo (the tiny model's
    perceiver latents), as many as the crops imply; images and text-only rows as written."""
    splits = load_splits(dialogs(tmp_path), split_by="row", held_out=(0.34, 0.34))
    report = audit(splits, processor, None)
    tokenize = processor.tokenizer
    for name, split in splits.items():
        [item] = split["item_name"]
        expected = sum(len(tokenize(answer, add_special_tokens=False)["input_ids"]) + 1 for answer in ANSWERS[item])
        photos = {"vase": 2, "helmet": 1, "kimono": 0}[item]
        summary = report["splits"][name]
        assert summary["answer_tokens"] == expected, item
        assert (summary["images"], summary["image_tokens"], summary["text_only_rows"]) == \
            (photos, 4 * photos, int(photos == 0)), item
    assert report["image_token_mismatches"] == []
    assert report["longest"]["data_id"] == "vase"


def test_max_length_counts_the_answer_tokens_it_cuts_and_names_the_rows_it_refuses(tmp_path, processor):
    splits = load_splits(dialogs(tmp_path), split_by="row", held_out=(0.34, 0.34))
    longest = audit(splits, processor, None)["longest"]
    # The vase row ends "...years.<end_of_utterance>\n": two tokens fewer drop its last end of utterance (which
    # carries loss) and the newline (which does not).
    cut = audit(splits, processor, longest["tokens"] - 2)["max_length"]
    assert (cut["rows_cut"], cut["answer_tokens_lost"], cut["rows_refused"]) == (1, 1, [])
    refused = audit(splits, processor, 8)["max_length"]  # shorter than any row's prompt ("<s> User: What is...")
    assert refused["rows_cut"] == 0 and len(refused["rows_refused"]) == 3
    assert all("leaving no room for the answer within max_length=8" in row["why"] for row in refused["rows_refused"])


def test_histogram_bins_are_powers_of_two():
    assert histogram([5, 6, 9, 130]) == [[4, 7, 2], [8, 15, 1], [16, 31, 0], [32, 63, 0], [64, 127, 0],
                                         [128, 255, 1]]


def test_show_marks_exactly_the_answer_and_its_end_of_utterance(tmp_path):
    """Checked by hand: the helmet row, piped, so the loss tokens stand between [[ and ]]; its image is 4
    <image> tokens between two <fake_token_around_image>."""
    source = dialogs(tmp_path)
    result = run_cli("data", "--dataset", source, "--split-by", "row", "--validation-fraction", "0.34",
                     "--test-fraction", "0.34", "--model", "tiny", "--device", "cpu", "--show", "helmet",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    heading, rendered = result.stdout.split("\n", 1)
    assert heading == "row 0 (data_id=helmet) of the 'train' split; the tokens that carry loss are between " \
                      "[[ and ]]:"
    # (a run decoded alone loses the space its first token starts with: "▁A" shows as "A")
    assert rendered == ("<s> User:<fake_token_around_image><image>×4<fake_token_around_image> What is this?"
                        "<end_of_utterance>\nAssistant:[[A helmet.<end_of_utterance>]]\n\n")


@pytest.mark.parametrize("show, message", [
    ("lamp", "--show lamp: no row of the data set has that data_id."),
])
def test_show_refuses_a_row_that_is_not_there(show, message, tmp_path):
    result = run_cli("data", "--dataset", dialogs(tmp_path), "--split-by", "row", "--validation-fraction", "0.34",
                     "--test-fraction", "0.34", "--model", "tiny", "--device", "cpu", "--show", show, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {message}", result.stderr
