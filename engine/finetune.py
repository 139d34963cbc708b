"""What `python run.py` runs on every rank: train, then answer and score the test split with what
was trained. The one engine module that imports eval/ (eval/ builds on the engine, not the reverse)."""

import json

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from engine.config import TrainConfig
from engine.launch import setup_runtime
from engine.trainer import train
from eval.evaluate import evaluate_run


@record  # a rank's exception reaches the launching process's report
def finetune(config: TrainConfig) -> dict:
    summary = train(config)  # returns once the training model is freed: evaluation loads OUT/final afresh
    if summary["completed"] and not config.skip_eval:
        runtime = setup_runtime(config)
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
        summary["eval"] = evaluate_run(config, runtime, summary["steps"])
        if runtime.is_main:
            (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
