"""What `python run.py` runs on every rank: train, then answer and score the test split with what
was trained. It sits above both engine/ and eval/ (eval/ builds on the engine, never the reverse)."""


from torch.distributed.elastic.multiprocessing.errors import record
from transformers.utils import logging as hf_logging

from engine.config import TrainConfig
from engine.device_memory import free_device_memory
from engine.metrics import Scalars
from engine.outputs.publish import write_json
from engine.runtime import setup_runtime
from engine.trainer import train
from errors import UsageError
from eval.evaluate import evaluate_run


@record  # a rank's exception reaches the launching process's report
def finetune(config: TrainConfig) -> dict:
    # Ranks that `--gpus N` spawns never pass through run.py's main, which turns off transformers' own bars
    # (every rank's "Loading weights"): the terminal shows the main rank's bars alone.
    hf_logging.disable_progress_bar()
    summary = train(config)
    runtime = setup_runtime(config)
    # The training model is unreferenced now but held in cycles (activation checkpointing, autocast, FSDP's
    # units): freed here, before evaluation loads OUT/final afresh, not whenever the collector next runs.
    free_device_memory(runtime.device)
    if summary["completed"] and not config.skip_eval:
        summary["eval"] = evaluate_run(config, runtime, summary["steps"])
        if runtime.is_main:
            write_json(config.out / "summary.json", summary)
            charts_to_tensorboard(config, summary)
    return summary


def charts_to_tensorboard(config: TrainConfig, summary: dict) -> None:
    """The run's score and loss charts as TensorBoard images, as `run.py report` draws them; matplotlib is
    the report extra, not a runtime package, so without it the run says so in one line and goes on."""
    try:
        from eval.charts import run_charts
    except UsageError as missing:
        print(f"no charts in TensorBoard: {missing}")
        return
    scalars = Scalars(config.out / "tensorboard", True, 0)
    for name, figure in run_charts(config.out.name, summary).items():
        scalars.figure(summary["steps"], name, figure)
    scalars.close()
