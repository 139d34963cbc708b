"""--select-by: OUT/final is the checkpoint whose answers to the select rows score best, under every strategy.

Each run is tiny: 4 steps of the tiny model on 2 exhibits, an evaluation point after every step, all 4 checkpoints
kept, the whole validation split (5 rows, so that 2 ranks share it 3 and 2) answered 8 tokens long. chrF, a
character metric, moves with nearly any change of an answer. What a run records is checked against what the
test recomputes another way: the best of the recorded values, the weights of that checkpoint, and the metric of
OUT/final's answers, loaded as evaluation loads it and scored with eval/metrics.py.
"""

import dataclasses
import gc
import json

import pytest
import torch
from safetensors.torch import load_file

from engine.config import SELECT_BY, TrainConfig, from_approach
from engine.data.sources import data_settings, load_splits
from engine.greedy import generate_ids
from engine.optim.optimizer import optimizer_for
from engine.outputs import checkpoint
from engine.plan.evaluation import selecting_plan
from engine.plan.fit import WidestBatch, plan_run
from engine.plan.memory_trace import MemoryTrace
from engine.plan.ranks import plan_ranks, traced_step
from engine.precision import PRECISIONS
from engine.runtime import Runtime
from engine.select import evaluating
from engine.strategies import strategy_for
from errors import UsageError
from eval.evaluate import load_evaluated
from eval.generate import generate_answers
from eval.metrics import ROW_METRICS, set_metrics, text_metrics
from harness import SELECT, assert_one_sentence, run_cli, run_engine, saved_weights

CPU = torch.device("cpu")


def test_the_metrics_are_eval_metrics_with_their_directions():
    """The engine names the text metrics it cannot import (engine/ is below eval/): each as eval/metrics.py has it."""
    assert TrainConfig.__dataclass_fields__["select_by"].metadata["choices"] == tuple(SELECT_BY)
    texts = {name: way for name, way in SELECT_BY.items() if name != "val_loss"}
    assert SELECT_BY["val_loss"] == "lower" and texts == {name: ROW_METRICS[name] for name in texts}
    row = {"item_name": "wright-flyer", "model_generated_answer": "a flyer", "ground_truth_answer": "The flyer."}
    assert set(texts) <= set(set_metrics([row], text_metrics([row])))


def save(folder, step: int, **meta) -> None:
    checkpoint.save(folder, step, {"w": torch.zeros(1)}, {}, {"model": "tiny", **meta}, keep_last=1,
                    select_by=next(iter(meta)))


def test_best_goes_the_metrics_way_and_rotation_keeps_it(tmp_path):
    """Higher is better for a text metric, lower for the loss; of equals, the first; rotation keeps the best."""
    for step, value in ((1, 0.2), (2, 0.5), (3, 0.5), (4, 0.1)):
        save(tmp_path / "chrf", step, chrf=value, val_loss=1.0 / step)
    assert [p.name for p in checkpoint.complete(tmp_path / "chrf")] == ["step-000002", "step-000004"]
    assert checkpoint.best(tmp_path / "chrf", "chrf").name == "step-000002"
    assert checkpoint.best(tmp_path / "chrf").name == "step-000004"  # the lowest loss of those kept
    for step, value in ((1, 3.0), (2, 2.0), (3, 4.0)):
        save(tmp_path / "loss", step, val_loss=value)
    assert [p.name for p in checkpoint.complete(tmp_path / "loss")] == ["step-000002", "step-000003"]


def test_answering_puts_every_module_back_in_its_own_mode(tiny_model):
    """Evaluation mode (dropout off) while answering, then each module's own mode again, a part that was in
    evaluation mode included. (The loop's next step sets training mode anyway, so the losses alone would not
    show a model left in evaluation mode.)"""
    tiny_model.train()
    tiny_model.model.vision_model.eval()
    before = {name: module.training for name, module in tiny_model.named_modules()}
    with evaluating([tiny_model]):
        assert not any(module.training for module in tiny_model.modules())
    assert {name: module.training for name, module in tiny_model.named_modules()} == before


def assert_chose_the_best(summary: dict, out, metric: str = "chrf", whole: bool = True) -> None:
    """The run chose the checkpoint whose recorded metric is the best (the first of equals), and says so; OUT/final
    holds its weights (checked where one file holds them all, `whole`: not a sharded run's pieces)."""
    history = summary["history"][metric]
    best_step, best_value = max(history, key=lambda point: (point[1], -point[0]))
    assert summary["final"] == {"step": best_step, "select_by": metric, "value": best_value}
    chosen = out / "checkpoints" / f"step-{best_step:06d}"
    assert json.loads((chosen / "meta.json").read_text())[metric] == best_value
    if not whole:
        return
    final, trained = saved_weights(out / "final"), load_file(chosen / "model.safetensors")
    assert trained.keys() <= final.keys()
    for name, tensor in trained.items():
        assert torch.equal(final[name], tensor), name


def assert_same_choice(got: dict, expected: dict) -> None:
    """The same metric at every evaluation point (the same answers, up to the float rounding of a mean), and so
    the same checkpoint chosen."""
    steps, values = zip(*expected["history"]["chrf"], strict=True)
    assert [step for step, _ in got["history"]["chrf"]] == list(steps)
    assert [value for _, value in got["history"]["chrf"]] == pytest.approx(values, rel=1e-9)
    assert got["final"]["step"] == expected["final"]["step"]
    assert got["final"]["value"] == pytest.approx(expected["final"]["value"], rel=1e-9)


def recomputed(out, metric: str = "chrf") -> float:
    """The metric of OUT/final's answers to the select rows, as evaluation loads and answers (another batch)."""
    config = TrainConfig(**json.loads((out / "config.json").read_text()))
    rows = load_splits(**data_settings(config))["validation"].select(range(config.select_rows))
    model, processor = load_evaluated(str(out / "final"), None, CPU, torch.float32)
    records = generate_answers(model, processor, rows, batch_size=3, max_new_tokens=config.max_new_tokens, device=CPU)
    return set_metrics(records, text_metrics(records))[metric]


@pytest.mark.slow
def test_one_process_and_ddp_choose_the_same_checkpoint_by_its_answers(tmp_path, one_process):
    single, single_out = one_process("full", 4, **SELECT)
    ddp = run_engine(tmp_path / "ddp", "full", batch_size=2, gpus=2, parallel="ddp", **SELECT)
    assert len(single["history"]["chrf"]) == 4 and len({value for _, value in single["history"]["chrf"]}) > 1
    assert_same_choice(ddp, single)
    assert_chose_the_best(single, single_out)
    assert_chose_the_best(ddp, tmp_path / "ddp")
    assert recomputed(single_out) == pytest.approx(single["final"]["value"], rel=1e-9)


@pytest.mark.slow
def test_choosing_by_answers_trains_exactly_as_choosing_by_loss(tmp_path):
    """The same losses, gradient norms and checkpoints with --select-by chrf as with val_loss, under LoRA dropout and
    activation checkpointing: answering draws no random number (a dropout mask drawn differently would change the
    next loss) and changes no weight. Only OUT/final's step differs where the two choices do."""
    settings = dict(SELECT, train_modules=("projections",), lora_dropout=0.1, activation_checkpointing=True)
    runs = {by: run_engine(tmp_path / by, "lora", batch_size=4, gpus=None, **dict(settings, select_by=by))
            for by in ("chrf", "val_loss")}
    for key in ("train_loss", "grad_norm", "val_loss"):
        assert runs["chrf"]["history"][key] == runs["val_loss"]["history"][key], key
    for step in range(1, 5):
        weights = [load_file(tmp_path / by / "checkpoints" / f"step-{step:06d}" / "model.safetensors") for by in runs]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0]), step
    losses = runs["val_loss"]["history"]["val_loss"]
    assert runs["val_loss"]["final"]["step"] == min(losses, key=lambda point: (point[1], point[0]))[0]
    answers = runs["chrf"]["history"]["chrf"]
    assert runs["chrf"]["final"]["step"] == max(answers, key=lambda point: (point[1], -point[0]))[0]


@pytest.mark.slow
@pytest.mark.parametrize("approach, world, batch_size, extra", [
    ("full_fsdp", 2, 2, {}),  # rows 3 and 2: rank 1 answers its last batch again, in step
    ("full_mp", 2, 4, {"micro_batches": 2}),  # stage by stage, a row at a time
    ("full_mp", 4, 2, {"parallel": "pipeline+fsdp", "stages": 2, "micro_batches": 2}),  # 2 pipelines in step
])
def test_sharded_and_pipelined_runs_choose_as_one_process(tmp_path, one_process, approach, world, batch_size, extra):
    single, _ = one_process("full", 4, **SELECT)
    run = run_engine(tmp_path / "run", approach, batch_size=batch_size, gpus=world, **SELECT, **extra)
    assert_same_choice(run, single)
    assert_chose_the_best(run, tmp_path / "run", whole=False)


@pytest.mark.slow
def test_resume_refuses_a_run_chosen_another_way(tmp_path):
    run_engine(tmp_path, "full", batch_size=4, gpus=None, stop_after_steps=1, **SELECT)
    with pytest.raises(UsageError, match="it was written with --select-by chrf, this run with --select-by rouge_l"):
        run_engine(tmp_path, "full", batch_size=4, gpus=None, resume=True, **dict(SELECT, select_by="rouge_l"))
    with pytest.raises(UsageError, match="its select_max_new_tokens is 8, this run's is 16"):
        run_engine(tmp_path, "full", batch_size=4, gpus=None, resume=True, **dict(SELECT, max_new_tokens=16))


@pytest.mark.parametrize("args, message", [
    (["--select-by", "bogus"], "--select-by must be val_loss, token_f1, rouge_l, chrf or item_named, not 'bogus'."),
    (["--select-by", "chrf", "--select-rows", "0"], "--select-rows must be at least 1, not 0."),
    (["--select-by", "chrf", "--final", "last"], "--select-by chrf chooses the best checkpoint for --final best"),
    (["--select-by", "chrf", "--select-rows", "6"], "--select-rows 6 is more than the 5 rows of the validation split"),
])
def test_bad_selection_is_one_sentence_before_any_work(tmp_path, args, message):
    result = run_cli("--approach", "full", "--model", "tiny", "--device", "cpu", "--limit-exhibits", "2", *args,
                     "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert_one_sentence(result, message)
    assert not (tmp_path / "out").exists()


def measured_select_added(config: TrainConfig, base) -> tuple[int, int]:
    """(what training holds between steps, what answering the plan's rows adds to it) on the tiny model's real
    weights, after two real steps, with the strategy's own answers."""
    precision = PRECISIONS["fp32"]
    selecting = selecting_plan(config)
    with MemoryTrace() as trace:
        strategy = strategy_for(config, Runtime(CPU, precision=precision))
        processor = strategy.build(base)
        optimizer = optimizer_for(config, precision, strategy.parameters(), config.lr)
        for _ in range(2):
            traced_step(trace, strategy, optimizer, WidestBatch(config, None)(config.batch_size), config)
        gc.collect()  # as the plan does: what training left in reference cycles goes now
        held = trace.live
        trace.at_peak_of(lambda: 0)
        rows = [selecting.widest] * selecting.rows(strategy)
        with evaluating(strategy.parts):
            _, answers = generate_ids(strategy.model, processor, rows, config.max_new_tokens, CPU)
        assert answers.shape == (len(rows), config.max_new_tokens)  # not stopped early: the whole length counted
        return held, trace.peak - held


@pytest.mark.slow
@pytest.mark.parametrize("approach", ["lora", "full"])
def test_plan_counts_the_answers_beside_what_training_holds(tmp_path, approach):
    """The select phase is what training holds plus a generate of the widest select prompt: within 5% of a real
    one's addition (the plan's prefill over every new token costs a little more than generate's steps). Under full
    fine-tuning it is over the evaluation's generate phase, whose whole model holds no optimizer state."""
    config = from_approach(approach, model="tiny", device="cpu", limit_exhibits=2, batch_size=4, select_by="chrf",
                           select_rows=5, max_new_tokens=32, train_modules=("all",), output_dir=str(tmp_path / "out"))
    held, added = measured_select_added(config, tmp_path / "base")
    [plan] = plan_ranks(config, PRECISIONS["fp32"], WidestBatch(config, None)(4), False, selecting_plan(config))
    assert abs(plan.held_bytes - held) <= 64  # but for rotary tables, shared differently built on meta and loaded
    assert abs(plan.select_peak_bytes - held - added) <= 0.05 * added
    phases = plan_run(config, False, None, search=False)["phases"]
    assert phases["select"] == plan.select_peak_bytes
    assert "select" not in plan_run(dataclasses.replace(config, select_by="val_loss"), False, None, search=False)[
        "phases"]
    if approach == "full":
        assert phases["select"] > phases["generate"]
