"""What the device holds when a run evaluates: the training model is gone before evaluation loads, evaluation
holds one model at a time in the run's dtype, and QLoRA is evaluated on its NF4 base, as it trained.

The Python garbage collector stays off while each is checked (`gc.disable()`): whatever is freed is then freed
by the code itself, as on a GPU, where a collection that happens to run in time is no help."""

import contextlib
import gc
import json
import os
import shutil
import weakref
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import eval.score
import models
from engine.build import apply_approach, load_whole
from engine.config import from_approach
from engine.data.prompts import prompt_batch
from engine.data.sources import load_splits
from engine.precision import PRECISIONS
from engine.runtime import Runtime
from engine.tensorboard import Scalars
from eval.evaluate import evaluate_run, load_evaluated
from eval.generate import generate_answers
from eval.results_csv import SCORE, read_results
from eval.score import load_judge, similarity_scores
from finetune import trained_run
from harness import run_engine, spawn
from quant import Linear4bit

CPU = torch.device("cpu")
BF16_MIXED = PRECISIONS["bf16-mixed"]  # a GPU run's precision: bf16 weights, which CPU runs too


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# ---- the training model is freed before evaluation loads (issue 25, item 7) ------------------------

class _EvaluationStarted(Exception):
    pass


def training_tensors_alive_at_evaluation(rank: int, world: int, folder, parallel: str) -> dict:
    """One step of LoRA with activation checkpointing, then (at once) how many of the training model's
    tensors -- the model, its parameters and buffers, the optimizer's state -- are still alive when
    evaluation starts. Run on each rank of `world` (a process group already joined when `world` > 1)."""
    import engine.trainer
    import finetune

    if world > 1:
        os.environ["WORLD_SIZE"] = str(world)  # as torchrun sets it: the run joins the group that is up
    watched, alive = [], []
    loop = engine.trainer.loop

    def watched_loop(run, *args):
        result = loop(run, *args)
        state = [t for per_param in run.optimizer.state.values() for t in per_param.values()
                 if isinstance(t, torch.Tensor)]
        tensors = [t for part in [run.strategy.model, *run.strategy.parts]
                   for t in (*part.parameters(), *part.buffers())]
        watched.extend(weakref.ref(t) for t in [run.strategy.model, *tensors, *state])
        return result

    def evaluation_starts(run, runtime, scalars, step):
        alive.append(sum(ref() is not None for ref in watched))
        raise _EvaluationStarted

    config = from_approach("lora", parallel=parallel, gpus=world if world > 1 else None, model="tiny",
                           limit_exhibits=1, batch_size=1, max_steps=1, eval_every=1.0, output_dir=str(folder),
                           device="cpu", final="last", activation_checkpointing=True)
    with mock.patch.object(engine.trainer, "loop", watched_loop), \
            mock.patch.object(finetune, "evaluate_run", evaluation_starts), collector_off():
        with contextlib.suppress(_EvaluationStarted):
            finetune.finetune(config)
    return {"alive": alive, "watched": len(watched)}


def test_the_training_model_is_freed_before_evaluation_loads(tmp_path):
    """Activation checkpointing wraps each block's forward around the block's own bound method: a cycle,
    which only the cyclic collector frees."""
    result = training_tensors_alive_at_evaluation(0, 1, tmp_path / "run", "none")
    assert result["watched"] > 100 and result["alive"] == [0]


@pytest.mark.slow  # two ranks: ~10 s
def test_the_fsdp_training_model_is_freed_before_evaluation_loads(tmp_path):
    """FSDP's units and hooks hold their modules in cycles too; each rank frees its shards."""
    ranks = spawn(2, training_tensors_alive_at_evaluation, tmp_path, folder=tmp_path / "run", parallel="fsdp")
    assert all(rank["watched"] > 10 for rank in ranks) and [rank["alive"] for rank in ranks] == [[0], [0]]


# ---- evaluation holds one model at a time, in the run's dtype (item 5) -------------------------------

def evaluate(config) -> dict:
    """Evaluation after a bf16-mixed CPU run of `config`, as finetune.py hands it over."""
    runtime = Runtime(CPU, precision=BF16_MIXED)
    scalars = Scalars(config.out / "tensorboard")
    return evaluate_run(trained_run(config.resolved(gpu=False), runtime), runtime, scalars, 3)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    run_engine(out, "lora", batch_size=2, gpus=None)
    return out


@pytest.mark.parametrize("scorer", ["base", "self"])
def test_evaluation_holds_one_model_at_a_time_in_the_runs_dtype(lora_run, scorer, monkeypatch, tmp_path):
    """Each model load finds every earlier model freed: the trained model answers, then the judge scores, then
    the base model answers and the judge scores (`--scorer self`: each model scores its own answers, before it
    goes). Every one is in the run's bf16, the judge too. The scores are the named judge's."""
    out = shutil.copytree(lora_run, tmp_path / "lora")
    monkeypatch.setenv("MUSEFT_CACHE", str(tmp_path / "cache"))  # no baseline cached: the base model runs too
    loaded, earlier = [], []

    def one_at_a_time(load):
        def loading(spec, dtype, device, **kwargs):
            alive = sum(ref() is not None for ref in earlier)
            assert alive == 0, f"{spec} loads while {alive} tensors of an earlier model are alive"
            model, processor = load(spec, dtype, device, **kwargs)
            earlier.extend(weakref.ref(t) for t in (model, *model.parameters(), *model.buffers()))
            loaded.append(dtype)
            return model, processor
        return loading

    monkeypatch.setattr(models, "load", one_at_a_time(models.load))
    # The judge is its text decoder alone, loaded by its own function.
    monkeypatch.setattr(eval.score, "load_text_model", one_at_a_time(eval.score.load_text_model))
    config = from_approach("lora", model="tiny", limit_exhibits=2, batch_size=2, max_new_tokens=4,
                           output_dir=str(out), device="cpu", precision="bf16-mixed", scorer=scorer)
    with collector_off():
        evaluate(config)
    assert loaded == [torch.bfloat16] * (4 if scorer == "base" else 2)
    monkeypatch.undo()
    rows = read_results(out / "eval" / "results.csv")
    judge, processor = load_evaluated(str(out / "base"), out / "final" if scorer == "self" else None, CPU,
                                      torch.bfloat16)
    expected = similarity_scores(judge, processor.tokenizer, [row["model_generated_answer"] for row in rows],
                                 [row["ground_truth_answer"] for row in rows], batched=scorer != "self", device=CPU)
    assert [float(row[SCORE]) for row in rows] == pytest.approx(expected, abs=1e-6)


# ---- QLoRA is evaluated on its NF4 base, as it trained ----------------------------------------------

@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    run_engine(out, "qlora", batch_size=2, gpus=None, precision="bf16-mixed")
    return out, from_approach("qlora", model="tiny", limit_exhibits=2, output_dir=str(out), device="cpu",
                              precision="bf16-mixed", lora_target=("projections", "lm_head"))


class FloatBytesOn(TorchDispatchMode):
    """The bytes of floating-point tensors that live on `device`, op by op, and the most at once."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.live, self.peak, self.seen = device, 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == self.device and tensor.is_floating_point():
                storage = tensor.untyped_storage()
                if storage._cdata not in self.seen:
                    self.seen.add(storage._cdata)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, storage._cdata, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, key: int, size: int) -> None:
        self.seen.discard(key)
        self.live -= size


def training_model(config) -> torch.nn.Module:
    """The model QLoRA trained, built as training builds it (engine/build.py), with the run's trained adapter."""
    runtime = Runtime(CPU, precision=BF16_MIXED)
    model, _ = load_whole(config, runtime, None)
    apply_approach(model, config, runtime)
    adapter = {name.removeprefix("base_model.model."): tensor
               for name, tensor in load_file(config.out / "final" / "adapter_model.safetensors").items()}
    assert not model.load_state_dict(adapter, strict=False).unexpected_keys
    return model.eval()


@pytest.mark.slow  # a QLoRA run trained end to end (the `qlora_run` fixture)
def test_qlora_evaluation_never_holds_the_whole_float_model_on_the_device(qlora_run):
    """Evaluated on the meta device, which stands for the accelerator here: the float bytes it ever holds stay
    within what the training model kept there (the layers left in float, the NF4 state) plus one layer's float
    weight, the one being quantized. (The base is "tiny", built in place: from_pretrained would build its
    skeleton on the meta device, which is not the device under test. The weights do not matter here.)"""
    out, config = qlora_run
    trained = training_model(config)
    # (Not the adapter: a LoRA layer around a base on the meta device makes its adapter on the CPU.)
    kept = sum(t.numel() * t.element_size() for name, t in (*trained.named_parameters(), *trained.named_buffers())
               if t.is_floating_point() and ".lora_" not in name)
    layers = [m for m in trained.modules() if isinstance(getattr(m, "base", m), Linear4bit)]
    one_layer = max(m.in_features * m.out_features for m in layers) * torch.bfloat16.itemsize
    on_device = FloatBytesOn("meta")
    with on_device:
        model, _ = load_evaluated("tiny", out / "final", torch.device("meta"), torch.bfloat16)
    assert on_device.peak <= kept + one_layer, f"{on_device.peak} float bytes on the device, training kept {kept}"
    for path, layer in trained.named_modules():  # every NF4 layer of training is NF4 here, its adapter beside it
        if layer in layers:
            evaluated = model.get_submodule(path)
            assert type(evaluated) is type(layer) and isinstance(getattr(evaluated, "base", evaluated), Linear4bit)


@pytest.mark.slow  # a QLoRA run trained end to end (the `qlora_run` fixture)
def test_qlora_evaluation_answers_as_the_training_model(qlora_run):
    """The same logits bit for bit, so the same greedy answers: the NF4 base with the adapter unmerged, as in
    training (folding the adapter into dequantized weights rounds differently)."""
    out, config = qlora_run
    evaluated, processor = load_evaluated(str(out / "base"), out / "final", CPU, torch.bfloat16)
    trained = training_model(config)
    rows = list(load_splits("musequest", limit_exhibits=1)["test"])[:2]
    with torch.no_grad():
        inputs = prompt_batch(processor, rows)
        assert torch.equal(evaluated(**inputs).logits, trained(**inputs).logits)
    answers = [generate_answers(model, processor, rows, max_new_tokens=8, device=CPU) for model in (evaluated, trained)]
    assert answers[0] == answers[1] and any(row["model_generated_answer"] for row in answers[0])


@pytest.mark.slow  # an end-to-end run
def test_qlora_scores_before_training_on_its_nf4_base(qlora_run, monkeypatch, tmp_path):
    """The score before training answers with the NF4 base QLoRA trained on, not the bf16 base (which a 16 GB
    card cannot hold for the 8B): rebuilt here as training builds it, with its adapters at their start (B = 0,
    so they add nothing), its answers scored by the base's judge, row by row as the cache holds them."""
    out, config = qlora_run
    out = shutil.copytree(out, tmp_path / "qlora")
    # 8 new tokens, as the other evaluation tests: which base answers is the point, not how long (the random base
    # would answer all 512 of the default, in bf16, three times).
    config = from_approach("qlora", model="tiny", limit_exhibits=2, output_dir=str(out), device="cpu",
                           precision="bf16-mixed", lora_target=("projections", "lm_head"), max_new_tokens=8)
    monkeypatch.setenv("MUSEFT_CACHE", str(tmp_path / "cache"))
    evaluate(config)
    [cache] = (tmp_path / "cache" / "baselines").glob("*.json")
    runtime = Runtime(CPU, precision=BF16_MIXED)
    base, _ = load_whole(config, runtime, None)
    apply_approach(base, config, runtime)
    _, processor = load_evaluated(str(out / "base"), out / "final", CPU, torch.bfloat16)
    test = list(load_splits("musequest", limit_exhibits=2)["test"])
    rows = generate_answers(base.eval(), processor, test, batch_size=config.batch_size,
                            max_new_tokens=config.max_new_tokens, device=CPU)
    judge, tokenizer = load_judge("base", str(out / "base"), CPU, torch.bfloat16)
    expected = similarity_scores(judge, tokenizer, [row["model_generated_answer"] for row in rows],
                                 [row["ground_truth_answer"] for row in rows], batched=True, device=CPU)
    assert json.loads(cache.read_text())["scores"] == pytest.approx(expected, abs=1e-6)
