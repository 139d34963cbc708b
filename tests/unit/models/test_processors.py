"""models/processors.py: a folder's processor is read once a process for each content of its files; every reader
gets settings of its own; a folder whose files differ is read afresh."""

import json
import shutil

import pytest
from transformers import AutoProcessor

import models.processors
from models.processors import read_processor
from models.tiny import PROCESSOR_DIR

PROMPT = "User:<image>What is this exhibit?<end_of_utterance>\nAssistant: A biplane."


@pytest.fixture
def reads(monkeypatch):
    """The folders AutoProcessor reads, in order, from an empty cache (restored after the test)."""
    monkeypatch.setattr(models.processors, "_READ", {})
    read = []
    original = AutoProcessor.from_pretrained
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda spec, **kw: read.append(spec) or original(spec, **kw))
    return read


def test_the_same_files_elsewhere_are_read_once_and_each_reader_has_its_own_settings(tmp_path, reads):
    copy = tmp_path / "copy"
    shutil.copytree(PROCESSOR_DIR, copy)
    (copy / "model.safetensors").write_bytes(b"weights are not the processor's")
    (copy / "config.json").write_text(json.dumps({"model_type": "idefics2"}))  # its class is named by its own files
    first, second = read_processor(PROCESSOR_DIR), read_processor(copy)
    assert reads == [PROCESSOR_DIR]
    fresh = AutoProcessor.from_pretrained(copy)  # the independent reference: a whole read
    for processor in (first, second):
        assert processor.tokenizer(PROMPT)["input_ids"] == fresh.tokenizer(PROMPT)["input_ids"]
        assert processor.image_processor.to_dict() == fresh.image_processor.to_dict()
    other_side = {"left": "right", "right": "left"}[fresh.tokenizer.padding_side]
    first.tokenizer.padding_side = other_side
    first.image_processor.size = {"longest_edge": 28, "shortest_edge": 28}
    assert second.tokenizer.padding_side == fresh.tokenizer.padding_side != other_side
    assert second.image_processor.size == fresh.image_processor.size
    assert read_processor(copy).tokenizer.padding_side == fresh.tokenizer.padding_side


def test_a_folder_whose_processor_files_differ_is_read_afresh(tmp_path, reads):
    changed = tmp_path / "changed"
    shutil.copytree(PROCESSOR_DIR, changed)
    config = json.loads((changed / "processor_config.json").read_text())
    config["image_seq_len"] = 7
    (changed / "processor_config.json").write_text(json.dumps(config))
    assert read_processor(PROCESSOR_DIR).image_seq_len != 7
    assert read_processor(changed).image_seq_len == 7
    assert reads == [PROCESSOR_DIR, changed]
