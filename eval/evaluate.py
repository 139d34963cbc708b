"""`run.py eval` and `run.py score`: answer the test split and score the answers, or re-score a results file.

Both write the original's per-row CSV layout (eval/results_csv.py) and a `results.json` beside it
with the mean score and which scorer gave it, which `run.py report` reads.

Evaluation holds one model at a time, in phases: the evaluated model answers (and, as `--scorer self`,
is its own judge, so it scores before it goes), and is freed; then the judge (`--scorer base` or a
folder, in the evaluated model's dtype) loads, scores those answers, and is freed. After training,
the base model then does the same unless its score is cached (QLoRA's: the NF4 base it trained on).
Ranks share the rows: rank r answers and scores rows r, r+N, ... of the test split, holding one whole
model at a time like a one-process evaluation, and the main rank gathers every row in order.
"""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

import models
from engine.data.checks import check_special_tokens
from engine.data.sources import load_splits
from engine.device_memory import free_device_memory, phase_peak
from engine.outputs.export import TRAINING_CONFIG, named_base
from engine.outputs.folder import run_config
from engine.outputs.merge import load_adapted, load_nf4_base
from engine.outputs.publish import write_json
from engine.precision import precision_for
from engine.runtime import Runtime
from engine.tensorboard import Scalars
from eval.answers_table import answers_table, metrics_line, score_line
from eval.embedding_cache import EmbeddingCache
from eval.generate import generate_answers
from eval.metrics import retrieval_ranks, row_items, set_metrics, text_metrics
from eval.results_csv import average_score, read_results, write_results
from eval.score import distances, load_judge, pair_embeddings
from models.load import config_and_processor

Load = Callable[[], tuple[PreTrainedModel, ProcessorMixin]]  # loads a model when its phase starts

RESULTS_CSV, RESULTS_JSON = "results.csv", "results.json"


def load_evaluated(model_spec: str, adapter: Path | None, device: torch.device,
                   dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model to evaluate, in `dtype` (default: the device's default precision's frozen dtype):
    a Hugging Face id or folder, or an adapter's model as it trained (engine/outputs/merge.py)."""
    dtype = dtype or precision_for("auto", device).frozen_dtype
    if adapter is not None:
        model, processor = load_adapted(adapter, model_spec, device, dtype)
    else:
        model, processor = models.load(model_spec, dtype, device)
    return model.eval(), processor


def evaluate_test_split(model_spec: str, adapter: Path | None, data: dict, scorer: str, base: str, output: Path,
                        device: torch.device, batch_size: int = 4, max_new_tokens: int = 512) -> dict:
    """`run.py eval`: generate answers for the test split of `data` (load_splits' arguments), score them, write the
    CSV and results.json, show them; returns results.json's content."""
    test = load_splits(**data)["test"]
    check_special_tokens(test, "test", config_and_processor(evaluated_base(model_spec, adapter))[1])
    dtype = precision_for("auto", device).frozen_dtype
    scored, *_ = _answer_and_score(lambda: load_evaluated(model_spec, adapter, device, dtype), test, Runtime(device),
                                   scorer=scorer, base=base, dtype=dtype, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, which=None)
    results = write_scored(output, scored, scorer)
    _show(scored, None, results)
    return results


def evaluated_base(model_spec: str | None, adapter: Path | None) -> str:
    """The model `run.py eval` and `ask` answer with: --model, or the base its --adapter was trained on."""
    return model_spec or named_base(adapter)


def trained_on(model_spec: str | None, adapter: Path | None) -> dict:
    """The data settings (dataset, limit_exhibits, split_by and its fractions) of the run whose OUT/final is
    --adapter (its training_config.json) or --model (the run's config.json beside it); {} for any other model."""
    keys = ("dataset", "limit_exhibits", "split_by", "validation_fraction", "test_fraction")
    for folder in (Path(spec) for spec in (adapter, model_spec) if spec):
        for settings in (run_config(folder, TRAINING_CONFIG), run_config(folder.parent)):
            if settings is not None and "dataset" in settings:
                return {key: settings[key] for key in keys if key in settings}
    return {}


def rescore_csv(csv_file: Path, model_spec: str, scorer: str, output: Path, device: torch.device) -> dict:
    """`run.py score`: new scores for any results file with the original's columns, by `model_spec` itself
    (`--scorer self`) or by the judge `--scorer` names."""
    rows = read_results(csv_file)
    dtype = precision_for("auto", device).frozen_dtype
    if scorer == "self":
        model, processor = load_evaluated(model_spec, None, device, dtype)
        scored = _score(rows, model, processor.tokenizer, batched=False, device=device)
    else:
        judge, tokenizer = load_judge(scorer, model_spec, device, dtype)
        scored = _score(rows, judge, tokenizer, batched=True, device=device, cache=EmbeddingCache(judge))
    scored = Scored.of(rows, *scored)
    write_results(output, rows, scored.scores, scored.metrics)
    return {"score": average_score(scored.scores), "metrics": scored.summary(), "scorer": scorer, "rows": len(rows)}


@dataclass(frozen=True)
class Scored:
    """Answered rows in order, their similarity scores, and every per-row metric of eval/metrics.py."""
    rows: list[dict]
    scores: list[float]
    metrics: dict[str, list[float]]

    @classmethod
    def of(cls, rows: list[dict], scores: list[float], answers: torch.Tensor, references: torch.Tensor) -> "Scored":
        """With the metrics computed: the text metrics, and where each answer's judge embedding ranks its own
        reference among the other items' (an empty answer's embedding is zeros, which ranks last)."""
        empty = torch.tensor([not row["model_generated_answer"].strip() for row in rows])
        answers = answers.float().masked_fill(empty.unsqueeze(1), 0)
        ranks = retrieval_ranks(answers, references.float(), row_items(rows))
        return cls(rows, scores, {**text_metrics(rows), "retrieval_rank": [float(rank) for rank in ranks]})

    def summary(self) -> dict[str, float]:
        return set_metrics(self.rows, self.metrics)


def write_scored(folder: Path, scored: Scored, scorer: str, baseline: dict | None = None,
                 phase_peak_bytes: dict | None = None) -> dict:
    """OUT/eval's results.csv and results.json; `baseline`: the base model's cached results (score, metrics)."""
    rows = scored.rows
    folder.mkdir(parents=True, exist_ok=True)
    write_results(folder / RESULTS_CSV, rows, scored.scores, scored.metrics)
    baseline = baseline or {}
    results = {"score": average_score(scored.scores), "baseline_score": baseline.get("score"),
               "metrics": scored.summary(), "baseline_metrics": baseline.get("metrics"), "scorer": scorer,
               "rows": len(rows),
               "examples": [{k: r[k] for k in ("user_question", "model_generated_answer", "ground_truth_answer")}
                            for r in rows[:3]],
               **({"phase_peak_bytes": phase_peak_bytes} if phase_peak_bytes else {})}
    write_json(folder / RESULTS_JSON, results)
    return results


@dataclass(frozen=True, kw_only=True)
class TrainedRun:
    """What evaluation after training is handed (finetune.py makes it from the run's resolved config)."""
    final: Path  # OUT/final: an adapter on `base`, or a whole model
    adapter: bool
    base: str  # the base model's weights: OUT/base for the built-in tiny model, else its folder or hub id
    nf4_base: bool  # QLoRA: the base quantized as it trained
    keep_vision: bool  # QLoRA with the vision encoder left in float
    dtype: torch.dtype  # the run's frozen dtype: the evaluated models' and the judge's
    test: Dataset
    scorer: str
    batch_size: int
    max_new_tokens: int
    baseline_key: dict  # everything that changes the base model's score: where it is cached
    results: Path  # OUT/eval


def evaluate_run(run: TrainedRun, runtime: Runtime, scalars: Scalars, step: int) -> dict:
    """After training: OUT/final answers the test split and is scored, the rows split across every
    rank and gathered; the base model's score before training comes from a cache when this model,
    data and scorer were measured before. The main rank writes OUT/eval, logs the score and a few
    answers to the run's TensorBoard `scalars` on its step axis, and shows every row's."""
    device, dtype = runtime.device, run.dtype
    trained = (run.base, run.final) if run.adapter else (str(run.final), None)  # (model, adapter)
    settings = dict(scorer=run.scorer, base=run.base, dtype=dtype, batch_size=run.batch_size,
                    max_new_tokens=run.max_new_tokens)
    scored, processor, peaks = _answer_and_score(lambda: load_evaluated(*trained, device, dtype), run.test,
                                                 runtime, **settings, which="trained model")
    phases = [peaks]
    digest = hashlib.sha256(json.dumps(run.baseline_key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MUSEFT_CACHE", "~/.cache/museft")).expanduser() / "baselines" / f"{digest}.json"
    if not cache.exists():
        # The base's weights with the run's processor (the same image size and splitting). QLoRA's base is
        # the NF4 one it trained on: its adapter's gain is measured on the model it corrects, and a 16 GB
        # card, which QLoRA is for, cannot hold the 8B's bf16 base to answer with.
        load_base = (partial(load_nf4_base, run.base, run.keep_vision, device, dtype) if run.nf4_base
                     else partial(load_evaluated, run.base, None, device, dtype))
        base_scored, _, peaks = _answer_and_score(lambda: (load_base()[0].eval(), processor),
                                                  run.test, runtime, **settings, which="base model")
        phases.append(peaks)
        if runtime.is_main:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache, {"score": average_score(base_scored.scores), "scores": base_scored.scores,
                               "metrics": base_scored.summary()})
    phases = [peaks for rank in runtime.gather(phases) for peaks in rank]  # (and the cache file is written)
    results = {}
    if runtime.is_main:
        baseline = json.loads(cache.read_text())
        # Each phase's peak over the ranks and models, as `run.py plan` plans them (on a GPU; else None).
        peaks = {name: max((p[name] for p in phases if p.get(name) is not None), default=None) for name in phases[0]}
        results = write_scored(run.results, scored, run.scorer, baseline=baseline, phase_peak_bytes=peaks)
        scalars.log(step, {"eval/similarity_score": results["score"],
                           **{f"eval/{name}": value for name, value in results["metrics"].items()}})
        scalars.text(step, "eval/answers", "\n\n".join(
            f"**Q:** {e['user_question']}  \n**generated:** {e['model_generated_answer']}  \n"
            f"**reference:** {e['ground_truth_answer']}" for e in results["examples"]))
        _show(scored, baseline.get("scores"), results)  # a cache written before per-row scores holds the mean
    return results


def _answer_and_score(load: Load, split, runtime: Runtime, *, scorer: str, base: str, dtype: torch.dtype,
                      batch_size: int, max_new_tokens: int,
                      which: str | None) -> tuple[Scored, ProcessorMixin, dict[str, int | None]]:
    """Rank r's rows r, r+N, ... in two phases, one model on the device in each. Answers: `load()`'s model
    answers them (and as `--scorer self`, its own judge, scores them), then is freed. Scores: the judge
    (`scorer`, of `base`, in `dtype`) loads, scores them, and is freed. Every rank gets all the rows back in
    order, scored (Scored), the loaded model's processor, and this rank's peak in each phase (None off a GPU). The
    main rank's bars count its own share of the rows (`which` model they are for, when there are two)."""
    device = runtime.device
    mine = list(range(runtime.rank, len(split), runtime.world_size))
    phase_peak(device)  # each phase's peak counted afresh from here (on a GPU)
    model, processor = load()
    with _bar("answering", which, len(mine), "row", runtime) as bar:
        rows = generate_answers(model, processor, [split[i] for i in mine], batch_size=batch_size,
                                max_new_tokens=max_new_tokens, device=device, progress=bar.update)
    with _bar("scoring", which, 2 * len(rows), "text", runtime) as bar:  # each answer and its reference
        if scorer == "self":  # as the original scored: each text alone, through the evaluated model
            scored = _score(rows, model, processor.tokenizer, batched=False, device=device, progress=bar.update)
        del model  # its answers (and self-scores) are in: it goes before the judge comes
        free_device_memory(device)
        peaks = {"generate": phase_peak(device)}
        if scorer != "self":  # one fixed judge for every approach, batched with the padding masked out
            judge, tokenizer = load_judge(scorer, base, device, dtype)
            scored = _score(rows, judge, tokenizer, batched=True, device=device, progress=bar.update,
                            cache=EmbeddingCache(judge))
            del judge
            free_device_memory(device)
            peaks["judge"] = phase_peak(device)
    scores, answers, references = scored
    mine = list(zip(mine, rows, scores, answers.cpu(), references.cpu(), strict=True))  # embeddings: a row each
    done = sorted((item for part in runtime.gather(mine) for item in part), key=lambda item: item[0])
    _, rows, scores, answers, references = zip(*done, strict=True)
    return Scored.of(list(rows), list(scores), torch.stack(answers), torch.stack(references)), processor, peaks


def _score(rows: list[dict], model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, batched: bool,
           device: torch.device, progress: Callable[[int], object] = lambda texts: None,
           cache: EmbeddingCache | None = None) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Each row's score, and the embeddings of the answers and of the references it came from."""
    answers, references = pair_embeddings(model, tokenizer, [r["model_generated_answer"] for r in rows],
                                          [r["ground_truth_answer"] for r in rows], batched=batched, device=device,
                                          progress=progress, cache=cache)
    return distances(answers, references), answers, references


def _bar(task: str, which: str | None, total: int, unit: str, runtime: Runtime) -> tqdm:
    """A bar like the training's: on stderr, main rank only, left on screen when done."""
    return tqdm(total=total, desc=task if which is None else f"{task} ({which})", unit=unit,
                disable=not runtime.is_main)


def _show(scored: Scored, before: list[float] | None, results: dict) -> None:
    print(answers_table(scored.rows, scored.scores, before))
    print(score_line(results))
    print(metrics_line(results), flush=True)
