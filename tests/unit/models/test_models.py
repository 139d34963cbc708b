"""Model loading: tiny is deterministic; Idefics2 and Idefics3 folders load through one path."""

import pytest
import torch
from PIL import Image

import models
from engine.activation_checkpoint import apply_activation_checkpointing
from errors import UsageError
from models.parts import decoder_layers

CPU = torch.device("cpu")


def _inputs(processor, size=(70, 50)):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.new("RGB", size, (200, 40, 90))
    return processor(text=[text], images=[[image]], return_tensors="pt")


def test_tiny_is_deterministic_per_seed_and_small():
    first, again, other = models.build_tiny(5), models.build_tiny(5), models.build_tiny(6)
    params = sum(p.numel() for p in first.parameters())
    assert 1e6 < params < 1e7
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)
    for part in ("vision_model", "connector", "text_model"):
        assert hasattr(first.model, part)


@pytest.mark.parametrize("family", ["idefics2", "idefics3"])
def test_a_saved_folder_loads_back_with_equal_logits(family, tmp_path, processor):
    model, processor = (models.build_tiny(0), processor) if family == "idefics2" else models.tiny_idefics3(0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = models.load(str(tmp_path), torch.float32, CPU)
    assert loaded.config.model_type == family and type(loaded) is type(model)
    inputs = _inputs(processor)
    assert torch.equal(inputs["input_ids"], _inputs(loaded_processor)["input_ids"])
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, loaded.eval()(**inputs).logits, atol=1e-6)


def test_attention_implementation_is_selectable():
    model, _ = models.load("tiny", torch.float32, CPU, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    # The attribute alone is what load sets; what it selects shows in the forward: only eager attention
    # computes the weights that output_attentions returns (sdpa's fused kernel, the default, returns none).
    with torch.no_grad():
        attentions = model(input_ids=torch.tensor([[1, 5, 6, 7]]), output_attentions=True).attentions
    assert len(attentions) == len(decoder_layers(model)) and attentions[0].shape == (1, 4, 4, 4)


def test_non_idefics_models_and_unreachable_ids_are_refused(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8,
                num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="is a 'llama' model"):
        models.load(str(tmp_path), torch.float32, CPU)
    with pytest.raises(UsageError, match="cannot load a model config"):
        models.load(str(tmp_path / "missing"), torch.float32, CPU)


def test_shipped_processors_are_read_once_and_each_is_its_own():
    """The shipped files are read once a process and copied after, sharing the compiled tokenizer: each copy keeps
    its own settings, pads with its own side and pad token, and tokenizes as a processor read afresh does; the
    tokens an Idefics3 processor adds are its own."""
    from transformers import AutoProcessor

    from models.idefics3_processor import ADDED_TOKENS
    from models.tiny import PROCESSOR_DIR, tiny_idefics3_processor, tiny_processor

    fresh = AutoProcessor.from_pretrained(PROCESSOR_DIR).tokenizer
    idefics3 = tiny_idefics3_processor()
    first, second = tiny_processor(), tiny_processor()
    second.tokenizer.padding_side = "right" if first.tokenizer.padding_side == "left" else "left"
    second.tokenizer.pad_token = second.tokenizer.unk_token
    second.image_processor.size = {"longest_edge": 28, "shortest_edge": 28}
    assert first.image_processor.size != second.image_processor.size
    assert len(idefics3.tokenizer) == len(first.tokenizer) + len(ADDED_TOKENS) == len(fresh) + len(ADDED_TOKENS)
    texts = ["The 1903 Wright Flyer <global-img> <row_1_col_1>", "a"]
    for copied in (second, first, second):  # each call after the other's: nothing of one stays for the next
        fresh.padding_side, fresh.pad_token = copied.tokenizer.padding_side, copied.tokenizer.pad_token
        assert copied.tokenizer(texts, padding=True)["input_ids"] == fresh(texts, padding=True)["input_ids"]


def test_pad_token_without_an_embedding_row_falls_back_to_unk(processor):
    model = models.build_tiny(0)
    model.resize_token_embeddings(32003)  # a vocabulary without the shipped <pad> (id 32003)
    models.use_real_pad_token(processor, model)
    assert processor.tokenizer.pad_token == "<unk>" and model.config.pad_token_id == processor.tokenizer.unk_token_id


def test_activation_checkpointing_keeps_gradients_even_with_frozen_inputs(processor):
    inputs = _inputs(processor)
    grads = []
    for checkpointed in (False, True):
        model = models.build_tiny(0).train()
        for name, param in model.named_parameters():  # only a late layer trains: its inputs are frozen
            param.requires_grad_(name.startswith("model.text_model.layers.3."))
        if checkpointed:
            apply_activation_checkpointing(decoder_layers(model))
        model(**inputs).logits.float().square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_blocks_are_every_repeated_layer_in_forward_order(tiny_model):
    inner = tiny_model.model
    connector = [inner.connector.modality_projection, *inner.connector.perceiver_resampler.layers]
    assert models.blocks(tiny_model) == [*inner.vision_model.encoder.layers, *connector, *inner.text_model.layers]
    idefics3, _ = models.tiny_idefics3(0)
    assert models.blocks(idefics3)[-1] is idefics3.model.text_model.layers[-1]
    assert idefics3.model.connector.modality_projection in models.blocks(idefics3)


def test_checkpointing_reaches_the_connector_and_vision_layers_only_when_they_train(tiny_model):
    inner = tiny_model.model
    tiny_model.requires_grad_(False)
    frozen_vision = models.checkpointed_blocks(tiny_model)
    assert frozen_vision == [inner.connector.modality_projection, *inner.connector.perceiver_resampler.layers,
                             *inner.text_model.layers]
    inner.vision_model.encoder.layers[0].mlp.fc1.weight.requires_grad_(True)
    assert models.checkpointed_blocks(tiny_model) == [*inner.vision_model.encoder.layers, *frozen_vision]


@pytest.mark.parametrize("device,flag,expected", [("cuda", None, True), ("cuda", False, False), ("cpu", None, False),
                                                   ("cpu", True, True)])
def test_checkpointing_is_on_by_default_on_cuda_only(device, flag, expected):
    """The decision alone: the config resolved for the device (TrainConfig.resolved; nothing is put on it) and the
    strategy that applies it; the flag may override."""
    from engine.config import from_approach
    from engine.runtime import Runtime
    from engine.strategies import Strategy

    model = models.build_tiny(0)
    config = from_approach("lora", activation_checkpointing=flag).resolved(gpu=device == "cuda")
    Strategy(config, Runtime(torch.device(device))).checkpoint_activations(model)
    wrapped = [layer for layer in models.blocks(model) if "forward" in vars(layer)]  # an instance attribute
    assert wrapped == (models.checkpointed_blocks(model) if expected else [])


def test_a_weightless_model_has_real_buffers_and_reads_any_slice(tiny_model, processor, tmp_path):
    from models.lazy import load_on_meta

    tiny_model.save_pretrained(tmp_path, max_shard_size="5MB")  # several files and an index
    processor.save_pretrained(tmp_path)
    model, _, read = load_on_meta(tmp_path, torch.float32)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    for name, buffer in tiny_model.named_buffers():  # the rotary tables are not in the files
        assert torch.equal(model.get_buffer(name), buffer), name
    generator = torch.Generator().manual_seed(0)
    for name, weight in tiny_model.state_dict().items():
        flat = weight.reshape(-1)
        start = int(torch.randint(0, flat.numel(), (1,), generator=generator))
        stop = int(torch.randint(start, flat.numel() + 1, (1,), generator=generator))
        assert torch.equal(read(name, start, stop), flat[start:stop]), name
    with pytest.raises(UsageError, match="have no tensor 'lm_head.bias'"):
        read("lm_head.bias", 0, 1)


def test_a_model_built_on_meta_is_not_initialized_and_keeps_its_tied_weights(monkeypatch):
    """Initializing Idefics2-8B's meta weights took 1.7 of the 2.4 s a plan's every build took (models/lazy.py); a
    model whose output layer is its embedding (SmolVLM's) must still be built tied."""
    from transformers import AutoModelForImageTextToText, PreTrainedModel

    from models.lazy import parameters_on_meta

    initialized = []
    monkeypatch.setattr(PreTrainedModel, "_init_weights", lambda self, module: initialized.append(module))
    config = models.tiny.tiny_idefics3_config()
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    with parameters_on_meta():
        model = AutoModelForImageTextToText.from_config(config)
    assert initialized == []
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.lm_head.weight is model.get_input_embeddings().weight
    AutoModelForImageTextToText.from_config(config)  # outside, a model initializes as ever
    assert initialized


@pytest.mark.parametrize("family", ["idefics2", "idefics3"])
def test_stages_chained_give_the_models_own_loss(family, processor, tiny_model):
    from engine.loss import answer_loss, summed_token_loss
    from models.stages import split_points, stage

    model = tiny_model if family == "idefics2" else models.tiny_idefics3(0)[0].eval()
    batch = dict(_inputs(processor)) if family == "idefics2" else dict(_inputs(models.tiny_idefics3(0)[1]))
    batch["labels"] = batch["input_ids"].clone()
    with torch.no_grad():
        expected = summed_token_loss(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
        for stages in (1, 2, 4):
            points, hidden = split_points(model, stages), None
            for rank in range(stages):
                hidden = stage(model, points, rank, answer_loss)(hidden, batch)
            torch.testing.assert_close(hidden, expected, msg=f"{stages} stages")


def test_balanced_split_minimises_the_largest_stage_and_a_given_split_is_checked(tiny_model):
    import itertools

    from engine.loss import answer_loss
    from models.stages import split_points, stage

    def largest(points: list[int]) -> int:
        return max(sum(p.numel() for p in stage(tiny_model, points, r, answer_loss).parameters())
                   for r in range(len(points) + 1))

    for stages in (2, 3):
        best = min(largest(list(p)) for p in itertools.combinations(range(1, 4), stages - 1))
        assert largest(split_points(tiny_model, stages)) == best
    assert split_points(tiny_model, 2, (3,)) == [3]
    with pytest.raises(UsageError, match="--split needs 1 increasing layer indices between 1 and 3"):
        split_points(tiny_model, 2, (4,))
    with pytest.raises(UsageError, match="5 pipeline stages need at least 5 decoder layers"):
        split_points(tiny_model, 5)
