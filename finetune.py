"""What `python run.py` runs on every rank: train, then answer and score the test split with what
was trained. It sits above both engine/ and eval/ (eval/ builds on the engine, never the reverse)."""


from torch.distributed.elastic.multiprocessing.errors import record
from transformers.utils import logging as hf_logging

from engine.config import TrainConfig
from engine.data.fingerprint import split_fingerprint
from engine.data.sources import data_settings, load_splits
from engine.device_memory import free_device_memory
from engine.outputs.publish import write_json
from engine.runtime import Runtime, setup_runtime
from engine.tensorboard import Scalars
from engine.trainer import train
from errors import UsageError
from eval.evaluate import TrainedRun, evaluate_run
from eval.metrics import set_metrics, text_metrics


@record  # a rank's exception reaches the launching process's report
def finetune(config: TrainConfig) -> dict:
    # Ranks that `--gpus N` spawns never pass through run.py's main, which turns off transformers' own bars
    # (every rank's "Loading weights"): the terminal shows the main rank's bars alone.
    hf_logging.disable_progress_bar()
    runtime = setup_runtime(config)
    config = config.resolved(gpu=runtime.device.type == "cuda")  # every `auto` decided once, for train and eval
    summary = train(config, answer_metrics)
    # The training model is unreferenced now but held in cycles (activation checkpointing, autocast, FSDP's
    # units): freed here, before evaluation loads OUT/final afresh, not whenever the collector next runs.
    free_device_memory(runtime.device)
    if summary["completed"] and not config.skip_eval:
        scalars = Scalars(config.out / "tensorboard", enabled=runtime.is_main)  # beside the training's points
        summary["eval"] = evaluate_run(trained_run(config, runtime), runtime, scalars, summary["steps"])
        if runtime.is_main:
            write_json(config.out / "summary.json", summary)
            charts_to_tensorboard(config, summary, scalars)
        scalars.close()
    return summary


def answer_metrics(records: list[dict]) -> dict[str, float]:
    """Each text metric's mean over answer `records` (eval/metrics.py): what --select-by picks the best
    checkpoint by, given to the engine, which imports nothing of eval/."""
    return set_metrics(records, text_metrics(records))


def trained_run(config: TrainConfig, runtime: Runtime) -> TrainedRun:
    """What evaluation needs of a finished run (its resolved `config`), and the key of its base model's
    cached score: everything that changes that score (the judge's dtype too: scores cached before it followed
    the run's precision came from an fp32 judge; QLoRA's NF4 base)."""
    precision = runtime.precision
    test = load_splits(**data_settings(config))["test"]
    key = {"model": config.model, "seed": config.seed if config.base_copy is not None else None,
           "precision": precision.name,
           "judge_dtype": str(precision.frozen_dtype), "test": split_fingerprint(test),  # not its path: data change
           "scorer": config.scorer, "max_new_tokens": config.max_new_tokens,
           "image": [config.image_splitting, config.image_shortest_edge, config.image_longest_edge],
           **({"base": ["nf4", config.quant_keep_vision]} if config.quantized else {})}
    return TrainedRun(final=config.out / "final", adapter=config.trains_adapter, base=config.base_weights,
                      nf4_base=config.quantized, keep_vision=config.quant_keep_vision, dtype=precision.frozen_dtype,
                      test=test,
                      scorer=config.scorer, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                      baseline_key=key, results=config.out / "eval")


def charts_to_tensorboard(config: TrainConfig, summary: dict, scalars: Scalars) -> None:
    """The run's score and loss charts as TensorBoard images, as `run.py report` draws them; matplotlib is
    the report extra, not a runtime package, so without it the run says so in one line and goes on."""
    try:
        from eval.charts import run_charts
    except UsageError as missing:
        print(f"no charts in TensorBoard: {missing}")
        return
    for name, figure in run_charts(config.out.name, summary).items():
        scalars.figure(summary["steps"], name, figure)
