"""The Idefics3 family: the processor built offline splits pictures into tiles as SmolVLM's does, the collator puts
loss on answers only, a --max-length cut never splits a picture's tokens, and the shipped configs are the real
models' shapes."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Idefics3ForConditionalGeneration

import models
from engine.build import configure_processor
from engine.config import from_approach
from engine.data.collate import Collator
from engine.loss import IGNORE
from errors import UsageError
from models.idefics3_processor import ADDED_TOKENS, GLOBAL_IMAGE, TILE_TOKENS
from models.load import config_and_processor
from models.tiny import tiny_idefics3_config

CPU = torch.device("cpu")
MODELS = Path(models.__file__).parent
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
FAKE = "<fake_token_around_image>"


@pytest.fixture(scope="module")
def _idefics3():
    return config_and_processor("tiny-idefics3")[1]


@pytest.fixture
def idefics3(_idefics3):
    import copy

    return copy.deepcopy(_idefics3)


def quadrants(width: int, height: int) -> Image.Image:
    """Red left half, blue right half, with a green bottom-right quarter: each tile of a 2 x 2 split its own."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(BLUE, (width // 2, 0, width, height))
    image.paste(GREEN, (width // 2, height // 2, width, height))
    return image


def image_run(processor, picture: Image.Image) -> list[str]:
    """The tokens the processor puts where the text says <image>."""
    ids = processor(text=["<image>"], images=[[picture]])["input_ids"][0]
    return processor.tokenizer.convert_ids_to_tokens(ids)[1:]  # after <s>


def tile(name: str) -> list[str]:
    return [FAKE, name, *["<image>"] * 4]  # 4 tokens a tile: 4 x 4 patches of 14 px, pixel-shuffled by 2


# --- the processor -----------------------------------------------------------------------------


def test_idefics3_tokens_are_single_special_tokens_the_model_has_rows_for(idefics3):
    tokenizer, rows = idefics3.tokenizer, tiny_idefics3_config().text_config.vocab_size
    tokens = [FAKE, "<image>", "<end_of_utterance>", *ADDED_TOKENS]
    assert len(ADDED_TOKENS) == 1 + 36 and TILE_TOKENS[0] == "<row_1_col_1>" and TILE_TOKENS[-1] == "<row_6_col_6>"
    ids = [tokenizer.convert_tokens_to_ids(token) for token in tokens]
    assert all(tokenizer.tokenize(f"a{token}b")[1:-1] == [token] for token in tokens)  # one token, never split
    assert len(set(ids)) == len(ids) and max(ids) == rows - 1 == 32040  # 32004 shipped + 37, the last row
    assert set(ADDED_TOKENS) <= set(tokenizer.get_added_vocab())  # so the data checks refuse them written in text


def test_a_square_picture_becomes_2x2_tiles_and_the_whole_in_reading_order(idefics3):
    """112 px (2 tiles of 56 along the longer edge): rows of tiles, each row ended by a newline, then the whole
    picture scaled to one tile after a blank line; the pixels come in the order of their tokens."""
    picture = quadrants(112, 112)
    assert image_run(idefics3, picture) == [
        *tile("<row_1_col_1>"), *tile("<row_1_col_2>"), "<0x0A>",
        *tile("<row_2_col_1>"), *tile("<row_2_col_2>"), "<0x0A>",
        "<0x0A>", *tile(GLOBAL_IMAGE), FAKE]
    pixels = idefics3.image_processor([[picture]], return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (5, 3, 56, 56)
    red, blue, green = (((torch.tensor(c, dtype=torch.float) / 255 - 0.5) / 0.5).view(3, 1, 1)
                        for c in (RED, BLUE, GREEN))
    for index, colour in enumerate((red, blue, red, green)):  # row 1: red, blue; row 2: red, green
        torch.testing.assert_close(pixels[index], colour.expand(3, 56, 56), atol=0.02, rtol=0)
    whole = pixels[4]  # the global tile: the picture scaled down, its four quarters in place
    torch.testing.assert_close(whole[:, 10, 10], red.flatten(), atol=0.02, rtol=0)
    torch.testing.assert_close(whole[:, 45, 45], green.flatten(), atol=0.02, rtol=0)


def test_a_wide_picture_becomes_one_row_of_two_tiles_and_splitting_off_one_tile(idefics3):
    wide = quadrants(112, 56)  # scaled to 112 x 56: one row of two tiles
    assert image_run(idefics3, wide) == [*tile("<row_1_col_1>"), *tile("<row_1_col_2>"), "<0x0A>", "<0x0A>",
                                         *tile(GLOBAL_IMAGE), FAKE]
    idefics3.image_processor.do_image_splitting = False
    assert image_run(idefics3, wide) == [*tile(GLOBAL_IMAGE), FAKE]
    assert idefics3.image_processor([[wide]], return_tensors="pt")["pixel_values"].shape == (1, 1, 3, 56, 56)


def test_tiny_idefics3_is_a_built_in_model_and_takes_split_pictures(idefics3):
    model, processor = models.load("tiny-idefics3", torch.float32, CPU, seed=4)
    again, _ = models.tiny_idefics3(4)
    assert type(model) is Idefics3ForConditionalGeneration and type(processor) is type(idefics3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    assert not torch.equal(model.lm_head.weight, models.tiny_idefics3(5)[0].lm_head.weight)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    batch = processor(text=[processor.apply_chat_template(messages)], images=[[quadrants(70, 50)]], return_tensors="pt")
    assert batch["pixel_values"].shape[1] == 5 and (batch["input_ids"] == processor.image_token_id).sum() == 5 * 4
    with torch.no_grad():
        assert model(**batch).logits.shape == (*batch["input_ids"].shape, 32041)


# --- the collator ------------------------------------------------------------------------------


def dialog_row(*turns: tuple[str, str | None], images: int = 1) -> dict:
    """A row of user questions (the first `images` of them with a picture each) and answers (None: no answer)."""
    messages = []
    for number, (question, answer) in enumerate(turns):
        picture = [{"type": "image"}] if number < images else []
        messages.append({"role": "user", "content": [*picture, {"type": "text", "text": question}]})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    pictures = [quadrants(112, 112), quadrants(112, 56)][:images]
    return {"data_id": 1, "images": pictures, "dialog": json.dumps({"messages": messages})}


def test_no_image_row_or_column_token_carries_loss_and_every_answer_token_does(idefics3):
    answers = ["A bronze helmet.", "About 2500 years old."]
    row = dialog_row(("What is this?", answers[0]), ("And this one, how old?", answers[1]), images=2)
    batch = Collator(idefics3)([row, dialog_row(("Colour?", "Red."))])
    ids, labels = batch["input_ids"], batch["labels"]
    tokenizer = idefics3.tokenizer
    image_ids = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in (FAKE, "<image>", *ADDED_TOKENS)])
    in_images = torch.isin(ids, image_ids)
    # By hand: 2 x 2 tiles and the whole (5 tiles), then 1 x 2 and the whole (3): 8 x 4 <image>, 5 + 1 and
    # 3 + 1 <fake_token_around_image>, 4 + 2 <row_R_col_C>, 2 <global-img>.
    assert in_images[0].sum() == 32 + 10 + 6 + 2
    assert (labels[in_images] == IGNORE).all()
    # The labelled tokens are the answers and their <end_of_utterance>, token for token, nothing else.
    learnt = labels[0] != IGNORE
    assert torch.equal(labels[0][learnt], ids[0][learnt])
    edges = torch.diff(learnt.int(), prepend=torch.tensor([0]), append=torch.tensor([0]))
    spans = zip(torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist(),
                strict=True)
    assert [tokenizer.decode(ids[0][start:end]) for start, end in spans] == [f"{a}<end_of_utterance>" for a in answers]
    assert tokenizer.decode(ids[1][labels[1] != IGNORE]) == "Red.<end_of_utterance>"


# --- truncation --------------------------------------------------------------------------------


@pytest.mark.parametrize("family,splitting", [("idefics2", False), ("idefics2", True), ("idefics3", True)])
def test_a_cut_inside_a_later_pictures_tokens_cuts_before_that_picture_and_drops_its_pixels(family, splitting, idefics3,
                                                                                          processor):
    """A question with a picture after the last answer (its tokens carry no loss): a --max-length that falls inside
    that picture's tokens used to keep part of them, and the model's forward failed ("Image features and image
    tokens do not match"). The row is cut where that picture starts, its tiles are zeroed (what the model drops
    as padding), the answer is kept whole; a cut after the picture leaves it."""
    processor = idefics3 if family == "idefics3" else processor
    configure_processor(processor, from_approach("lora", image_splitting=splitting))  # Idefics2: 5 crops a picture
    model = models.tiny_idefics3(0)[0] if family == "idefics3" else models.build_tiny(0)
    row = dialog_row(("What is this?", "A helmet."), ("And this?", None), images=2)
    whole = Collator(processor)([row])
    messages = json.loads(row["dialog"])["messages"]
    before = processor.apply_chat_template(messages[:2]) + "User:"  # the text up to the second picture
    expected = processor(text=[before], images=[row["images"][:1]])["input_ids"][0]
    image = processor.image_token_id
    positions = torch.nonzero(whole["input_ids"][0] == image).flatten()
    first_tiles = len(processor.image_processor([row["images"][:1]])["pixel_values"][0])
    second_picture = positions[processor.image_seq_len * first_tiles + 2].item()  # inside the second picture
    cut = Collator(processor, max_length=second_picture)([row, dialog_row(("Colour?", "Red."))])
    kept = cut["attention_mask"][0].bool()
    assert cut["input_ids"].shape[1] == second_picture and cut["input_ids"][0][kept].tolist() == expected
    assert torch.equal(cut["labels"][0][kept], whole["labels"][0][: len(expected)])  # the answer, whole
    tiles = (cut["pixel_values"][0] != 0).flatten(1).any(dim=1)  # all-zero tiles are padding to the model
    assert (cut["input_ids"][0] == image).sum() == processor.image_seq_len * tiles.sum()
    assert tiles.sum() == first_tiles
    with torch.no_grad():
        model(**{key: value for key, value in cut.items() if key != "labels"})
    after = Collator(processor, max_length=whole["input_ids"].shape[1] - 2)([row])  # inside the last question's text
    assert torch.equal(after["input_ids"][0], whole["input_ids"][0][:-2])
    assert torch.equal(after["pixel_values"], whole["pixel_values"])


def test_a_cut_that_leaves_the_answer_nothing_is_still_refused(idefics3):
    row = dialog_row(("What is this?", "A helmet."))
    start = len(idefics3(text=[idefics3.apply_chat_template(json.loads(row["dialog"])["messages"][:1],
                                                           add_generation_prompt=True)],
                         images=[row["images"]])["input_ids"][0])
    with pytest.raises(UsageError, match=f"need {start} tokens"):
        Collator(idefics3, max_length=start)([row])


# --- the shipped configs -----------------------------------------------------------------------


@pytest.mark.parametrize("name,parameters,tile,size,seq_len", [
    # SmolVLM-256M: 256,484,928 parameters; (512/16)^2 / 4^2 = 64 tokens a 512 px tile, pictures at 2048 px.
    ("smolvlm_256m_config.json", 256_484_928, 512, 2048, 64),
    # Idefics3-8B: 8.46B; (364/14)^2 / 2^2 = 169 tokens a 364 px tile, pictures at 1456 px.
    ("idefics3_8b_config.json", 8_462_086_384, 364, 1456, 169)])
def test_a_shipped_idefics3_config_is_the_real_shape_with_a_fitted_processor(name, parameters, tile, size, seq_len):
    from models.lazy import build_on_meta

    model, processor = build_on_meta(str(MODELS / name), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert processor.image_seq_len == seq_len and processor.image_processor.do_image_splitting
    assert dict(processor.image_processor.size) == {"longest_edge": size}
    assert dict(processor.image_processor.max_image_size) == {"longest_edge": tile}
    assert model.config.image_token_id == processor.image_token_id == 32001  # the shipped tokenizer's <image>


def test_an_idefics3_config_whose_vocabulary_misses_the_image_tokens_is_refused(tmp_path):
    settings = json.loads((MODELS / "smolvlm_256m_config.json").read_text())
    settings["text_config"]["vocab_size"] = 32004
    (tmp_path / "small.json").write_text(json.dumps(settings))
    with pytest.raises(UsageError, match=r"vocab_size 32004 is smaller than the 32041 tokens"):
        config_and_processor(str(tmp_path / "small.json"))
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UsageError, match=r"is not an Idefics2 or Idefics3 config \(its model_type is 'llama'\)"):
        config_and_processor(str(tmp_path / "llama.json"))
