"""One frozen TrainConfig per run: an approach preset plus the user's overrides.

An approach is not a code path but three choices -- adapter, base-weight format, parallelism --
so hybrids are flag combinations. `validate` refuses what cannot work before anything runs.
Each TrainConfig field is also run.py's flag of that name: `option` declares its help, choices and
limits in one line, so the command line, the defaults and the checks cannot drift apart.
"""

import dataclasses
import importlib.util
import json
import math
import operator
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import UsageError

REAL_MODEL = "HuggingFaceM4/idefics2-8b"  # what --model auto trains on a GPU
# The built-in random-weight models (models/load.py BUILT_IN): a run writes their starting weights to OUT/base.
BUILT_IN_MODELS = ("tiny", "tiny-idefics3")

# name -> (adapter, quant, parallel, one line for --help)
APPROACHES: dict[str, tuple[str, str, str, str]] = {
    "lora": ("lora", "none", "none", "LoRA adapters on a bf16 base, one device (the default)"),
    "qlora": ("lora", "nf4", "none", "LoRA adapters on an NF4 4-bit base, one device"),
    "lora_ddp": ("lora", "none", "ddp", "LoRA, data parallel over --gpus ranks"),
    "full": ("none", "none", "none", "full fine-tuning, fp32 master weights, one device"),
    "full_mp": ("none", "none", "pipeline", "full fine-tuning, layers split across --gpus ranks, micro-batch pipeline"),
    "full_fsdp": ("none", "none", "fsdp", "full fine-tuning, fully sharded over --gpus ranks"),
}


def option(default: Any, help: str, *, choices: tuple[str, ...] = (), flag: str = "", default_help: str = "",
           minimum: float | None = None, above: float | None = None, maximum: float | None = None,
           below: float | None = None, finite: bool = False, cli: bool = True) -> Any:
    """A TrainConfig field and its command-line flag, defined once.

    `help` describes the flag (for a True-default bool, its `--no-...` flag); run.py appends the default, or
    `default_help` where the default is a sentinel. `validate` checks `choices` and the range: `minimum` <= value,
    `above` < value, value <= `maximum`, value < `below`, and (`finite`) neither inf nor nan; None passes.
    """
    bounds = dict(minimum=minimum, above=above, maximum=maximum, below=below, finite=finite)
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, flag=flag, **bounds,
                                                            default_help=default_help, cli=cli))


RANGE = (("minimum", "at least", operator.ge), ("above", "above", operator.gt), ("maximum", "at most", operator.le),
         ("below", "below", operator.lt))  # option's range keywords; a comparison with nan is False: nan fails them


def out_of_range(value: float, meta: Mapping[str, Any]) -> str:
    """The range of an `option` that `value` breaks, worded for `validate` ("finite and above 0"); "" if inside."""
    limits = [(f"{word} {meta[key]:g}", compare(value, meta[key])) for key, word, compare in RANGE
              if meta[key] is not None]
    if meta["finite"]:
        limits.insert(0, ("finite", math.isfinite(value)))
    return "" if all(inside for _, inside in limits) else " and ".join(words for words, _ in limits)


def flag(field: dataclasses.Field) -> str:
    """The field's command-line spelling: --field-name, --no-field-name for a True-default bool, or its own."""
    negated = "no-" if field.default is True else ""
    return field.metadata["flag"] or f"--{negated}{field.name.replace('_', '-')}"


# --select-by: what picks the best checkpoint, and which way is better. The text metrics are eval/metrics.py's
# (its ROW_METRICS, which tests/e2e/test_select_by.py holds this table to): the engine, below eval/, names them here.
SELECT_BY = {"val_loss": "lower", "token_f1": "higher", "rouge_l": "higher", "chrf": "higher", "item_named": "higher"}

HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")  # `name` or `owner/name`, as the hub spells them
MAX_EDGE = 8192  # pixels: an image of 8192 x 8192 stays under Pillow's decompression-bomb limit (89.5 megapixels)
HYBRID = "from --approach"  # adapter, quant and parallel default to the approach's choices


@dataclass(frozen=True)
class TrainConfig:
    approach: str = option("lora", "one of the approaches listed below")
    adapter: str = option("none", "override the approach's adapter, for hybrids", choices=("none", "lora"),
                          default_help=HYBRID)
    quant: str = option("none", "override the approach's base-weight format", choices=("none", "nf4"),
                        default_help=HYBRID)
    parallel: str = option("none", "override the approach's parallelism",
                           choices=("none", "ddp", "fsdp", "pipeline", "pipeline+fsdp"), default_help=HYBRID)
    model: str = option("auto", "'tiny' or 'tiny-idefics3' (built in, random weights), a local folder, a "
                                   "config.json (Idefics2 or Idefics3) or a Hugging Face id",
                        default_help="tiny on CPU, HuggingFaceM4/idefics2-8b on CUDA")
    dataset: str = option("musequest", "'musequest' (built in), a .jsonl or .json file of dialogs (TRL messages, "
                                       "ShareGPT, ...), an imagefolder, a save_to_disk folder or a Hugging Face id")
    split_by: str | None = option(None, "a data set with a train split only: the column whose rows stay in one "
                                        "split as validation and test splits are cut from it (e.g. item_name); "
                                        "'row' cuts row by row", default_help="none: the data set's own splits")
    validation_fraction: float = option(0.1, "--split-by: the share of the column's values held out for validation",
                                        above=0, below=1)
    test_fraction: float = option(0.1, "--split-by: the share of the column's values held out for the test split",
                                  above=0, below=1)
    output_dir: str = option("", "where checkpoints, logs and the final model go", default_help="runs/<approach>")
    limit_exhibits: int | None = option(None, "keep only the first K exhibits (small demos and tests)",
                                        minimum=1, default_help="all")
    # optimisation: the original project's settings
    epochs: int = option(3, "passes over the train split", minimum=1)
    max_steps: int | None = option(None, "total optimizer steps; overrides --epochs and sets the lr schedule",
                                   minimum=1, default_help="--epochs passes")
    stop_after_steps: int | None = option(None, "stop (with a checkpoint) after this many steps of this "
                                                "invocation; continue later with --resume", minimum=1,
                                          default_help="none: run to the end")
    batch_size: int = option(4, "rows per micro-batch per device", minimum=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", minimum=1)
    lr: float = option(1e-5, "peak learning rate", above=0, finite=True)
    lr_scaling: str = option("none", "scale --lr by the square root of (or linearly in) global batch / "
                                     "--lr-reference-batch, as some of the original's multi-GPU runs did",
                             choices=("none", "sqrt", "linear"))
    lr_reference_batch: int = option(10, "the global batch --lr was tuned for; the default is the original's "
                                         "one-GPU full fine-tuning batch, from which its FSDP runs scaled",
                                     minimum=1)
    weight_decay: float = option(0.01, "AdamW weight decay", minimum=0, finite=True)
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas", minimum=0, below=1, cli=False)
    warmup_ratio: float = option(0.03, "fraction of steps of linear warm-up", minimum=0, maximum=1)
    max_grad_norm: float = option(0.3, "gradient clipping norm (inf: no clipping)", above=0)
    train_modules: tuple[str, ...] = option(("projections",), "what full fine-tuning trains: 'all', presets "
                                            "(projections, text, connector, vision, all-linear) or regexes over "
                                            "module paths")
    optimizer: str = option("adamw", "adamw (moments in the trained weights' dtype) or adamw8bit (both moments in "
                                     "8-bit blocks, bitsandbytes' quantization: 2 bytes a trained weight)",
                            choices=("adamw", "adamw8bit"))
    optimizer_offload: str = option("none", "cpu: AdamW's fp32 master weights and moments in host memory, "
                                            "stepped on the CPU; the GPU keeps the weights and gradients only "
                                            "(4 bytes a trained weight under --precision bf16)",
                                    choices=("none", "cpu"))
    activation_checkpointing: bool | None = option(None, "recompute the activations of the decoder layers, the "
                                                         "connector (and vision layers that train) in backward "
                                                         "instead of keeping them",
                                                   default_help="on for CUDA, off on CPU")
    data_workers: int | None = option(None, "processes that collate batches ahead of the step, a few steps deep "
                                            "(0: the loop collates each step itself, as it waits)", minimum=0,
                                      maximum=64, default_help="on CUDA up to 4 a rank, as the machine's cores "
                                                               "allow; 0 on CPU, whose cores the step needs")
    compile: bool = option(False, "compile each vision, connector and decoder layer with torch.compile "
                                  "(regional, as torchtitan does): faster steps after a compile time of its own")
    # FSDP
    fsdp_reduce_dtype: str = option("fp32", "fsdp: the dtype gradients are summed across ranks in: fp32, as "
                                            "accurate as one process whatever the rank count (torchtitan's "
                                            "default), or bf16, half the bytes on the wire, each sum rounded to bf16",
                                    choices=("fp32", "bf16"))
    fsdp_prefetch: bool = option(True, "fsdp: gather each block only as it runs and wait for each reduce-scatter "
                                       "at once, instead of overlapping both with the neighbouring block's compute "
                                       "(the same results, slower, a block's weights and gradient less memory)")
    # pipeline (full_mp)
    micro_batches: int = option(4, "full_mp: micro-batches each batch is cut into so the stages work at once; "
                                   "1 is the original's naive split", minimum=1)
    schedule: str = option("gpipe", "full_mp: all forwards then all backwards (gpipe), or one forward one "
                                    "backward, fewer activations alive (1f1b)", choices=("gpipe", "1f1b"))
    split: tuple[int, ...] = option((), "full_mp: first decoder layer of every stage after the first", minimum=1,
                                    default_help="balanced by parameters; the original's 4-GPU split is 5 14 23")
    stages: int | None = option(None, "pipeline+fsdp: pipeline stages; the N ranks form S stages of N/S ranks, each "
                                      "stage sharded FSDP-style over its ranks", minimum=2,
                                default_help="needed with pipeline+fsdp; the pipeline alone has a stage per rank")
    # LoRA: the original project's settings
    lora_target: tuple[str, ...] = option(("projections",), "modules that get LoRA: presets (projections, text, "
                                          "connector, vision, all-linear, lm_head: the output layer, which the "
                                          "CPU demos add) or regexes over module paths")
    lora_r: int = option(8, "LoRA rank", minimum=1)
    lora_alpha: float = option(64, "LoRA alpha", above=0, finite=True)
    lora_dropout: float = option(0.1, "dropout on the LoRA input", minimum=0, below=1)
    lora_rslora: bool = option(True, "scale LoRA by alpha/r instead of rsLoRA's alpha/sqrt(r)", flag="--no-rslora")
    lora_init: str = option("gaussian", "init of LoRA's A matrix", choices=("gaussian", "kaiming"))
    # QLoRA
    quant_keep_vision: bool = option(False, "qlora: keep the vision encoder in bf16",
                                     default_help="NF4, as the original")
    # data and processor
    max_length: int | None = option(None, "truncate each answer so the sequence fits this many tokens",
                                    minimum=1, default_help="none: every row must fit the model's context")
    image_splitting: bool | None = option(None, "split each image into crops of the vision encoder's size plus the "
                                                "whole image scaled down (Idefics3: a grid of tiles): more image "
                                                "tokens and memory, finer detail",
                                          default_help="the processor's own: off for Idefics2-8B, on for Idefics3 "
                                                       "and SmolVLM")
    image_shortest_edge: int | None = option(None, "processor resize: shortest image edge in pixels",
                                             minimum=1, maximum=MAX_EDGE, default_help="the processor's")
    image_longest_edge: int | None = option(None, "processor resize: longest image edge in pixels",
                                            minimum=1, maximum=MAX_EDGE, default_help="the processor's")
    # runtime
    seed: int = option(0, "seed for the tiny model, data order and dropout", minimum=0, maximum=2**32 - 1)
    device: str = option("auto", "auto (CUDA if present), cpu or cuda", choices=("auto", "cpu", "cuda"))
    precision: str = option("auto", "fp32 (everything fp32; the CPU default), bf16-mixed (frozen weights bf16, "
                                    "trained weights fp32, compute under bf16 autocast; the CUDA default) or bf16 "
                                    "(trained weights and their gradients and moments bf16 too, every update "
                                    "stochastically rounded); auto picks by device",
                            choices=("auto", "fp32", "bf16-mixed", "bf16"))
    gpus: int | None = option(None, "number of ranks; on a machine without CUDA the ranks are CPU processes on gloo",
                              default_help="what torchrun started, else 1", minimum=1)
    attn_implementation: str = option("sdpa", "attention kernel", choices=("sdpa", "eager", "flash_attention_2"))
    setup_timeout: float = option(60, "minutes the other ranks wait while the main rank fetches the model (the 8B "
                                      "is a 33.6 GB download) before giving up", above=0, maximum=24 * 60)
    # evaluation, checkpoints, outputs
    eval_every: float = option(0.05, "validation + checkpoint every this fraction of steps", above=0, maximum=1)
    skip_eval: bool = option(False, "do not answer and score the test split after training")
    scorer: str = option("base", "whose embeddings score the answers: self (the trained model, the original's "
                                 "way), base (the base model: one judge for every approach) or a model folder")
    max_new_tokens: int = option(512, "answer length cap in evaluation (and in --select-by's answers)", minimum=1)
    keep_last: int = option(2, "checkpoints kept besides the best one", minimum=1)
    memory_budget: float | None = option(None, "GiB each rank may use: before loading, refuse a run whose planned "
                                               "peak (run.py plan) is more", above=0, finite=True,
                                         default_help="the GPU's memory less 8%%; none on CPU")
    final: str = option("best", "which weights go to OUT/final: the best checkpoint by --select-by, or the last",
                        choices=("best", "last"))
    select_by: str = option("val_loss", "what makes a checkpoint the best: the lowest validation loss, or the "
                                        "highest text metric of its answers to --select-rows validation rows, "
                                        "generated at every evaluation point", choices=tuple(SELECT_BY))
    select_rows: int = option(16, "--select-by a text metric: answer the first N rows of the validation split, "
                                  "greedily, up to --max-new-tokens", minimum=1)
    resume: bool = option(False, "continue from the last complete checkpoint")
    overwrite: bool = option(False, "replace the run in a used --output-dir: delete what a run writes there first")
    tensorboard: bool = option(False, "serve TensorBoard for this run")
    tensorboard_port: int = option(6006, "port for --tensorboard", minimum=1, maximum=65535)

    def resolved(self, gpu: bool) -> "TrainConfig":
        """This config with every `auto` decided for a GPU run or a CPU one: the one place each rule is written,
        applied once when the device is known (engine/trainer.py, finetune.py, the planner); nothing downstream
        asks again. --model: the built-in tiny model on a CPU, Idefics2-8B on a GPU; --precision: bf16-mixed
        on a GPU, fp32 on a CPU; activation checkpointing: on a GPU (as every one of the original's runs had it),
        off on a CPU, where memory is rarely what limits a run. --device and --output-dir are written out too, so
        that OUT/config.json holds no `auto` and no empty setting."""
        return dataclasses.replace(
            self, device=("cuda" if gpu else "cpu") if self.device == "auto" else self.device,
            output_dir=str(self.out),
            model=(REAL_MODEL if gpu else "tiny") if self.model == "auto" else self.model,
            precision=("bf16-mixed" if gpu else "fp32") if self.precision == "auto" else self.precision,
            activation_checkpointing=gpu if self.activation_checkpointing is None else self.activation_checkpointing,
            data_workers=_data_workers(gpu, self.gpus) if self.data_workers is None else self.data_workers)

    @property
    def base_copy(self) -> Path | None:
        """Where the built-in tiny model's exact starting weights are written (OUT/base), so that evaluation,
        `run.py merge` and any tool can rebuild it; None for a model that lives in a folder or on the hub."""
        return self.out / "base" if self.model in BUILT_IN_MODELS else None

    @property
    def base_weights(self) -> str:
        """Where the (resolved) base model's weights are read from once the run has started."""
        return str(self.base_copy or self.model)

    @property
    def trains_adapter(self) -> bool:
        """LoRA (on a float or an NF4 base): the run trains and exports an adapter, not the whole model."""
        return self.adapter != "none"

    @property
    def quantized(self) -> bool:
        """QLoRA: the frozen base is NF4, quantized as it loads."""
        return self.quant == "nf4"

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.approach}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _data_workers(gpu: bool, gpus: int | None) -> int:
    """--data-workers on its default: on a GPU up to 4 collating processes a rank (a step of 14 MuseQuest rows takes
    a core about as long as an H200 takes to train on them), leaving each rank a core of its own; on a CPU none,
    since the step itself needs every core there."""
    if not gpu:
        return 0
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", gpus or 1))  # torchrun's ranks on this machine, or ours
    return max(0, min(4, len(os.sched_getaffinity(0)) // ranks_here - 1))


# Flags that change how a run is carried out, watched or reported, never what it computes: --resume may
# change them. Every other flag must equal the checkpoint's. (--precision is compared as resolved for the
# device, and the ranks through the global batch and the world size.)
RESUMABLE = {"resume", "overwrite", "stop_after_steps", "tensorboard", "tensorboard_port", "skip_eval", "scorer",
             "max_new_tokens", "keep_last", "output_dir", "device", "precision", "gpus", "batch_size", "grad_accum",
             "micro_batches", "schedule", "activation_checkpointing", "memory_budget", "fsdp_prefetch",
             "setup_timeout", "data_workers"}


def result_settings(config: TrainConfig) -> dict[str, Any]:
    """The flags a resumed run must share with its checkpoint, as JSON would give them back."""
    return json.loads(json.dumps({field.name: getattr(config, field.name) for field in dataclasses.fields(config)
                                  if field.name not in RESUMABLE}))


def as_given(name: str, value: Any) -> str:
    """A setting of `result_settings` as a command line gives it: "with --lr 0.005", "with --no-rslora",
    "without --max-length" (for messages that name what differs)."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    if value is None or (isinstance(value, bool) and value == field.default):
        return f"without {flag(field)}"
    if isinstance(value, bool):
        return f"with {flag(field)}"
    return f"with {flag(field)} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def from_approach(approach: str, **overrides) -> TrainConfig:
    """The preset's three choices, then the user's overrides; validated."""
    if approach not in APPROACHES:
        raise UsageError(f"unknown approach {approach!r}; choose one of {', '.join(APPROACHES)}.")
    adapter, quant, parallel, _ = APPROACHES[approach]
    settings = dict(approach=approach, adapter=adapter, quant=quant, parallel=parallel)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    config = TrainConfig(**settings)
    validate(config)
    return config


def check_scorer(spec: str) -> None:
    """Refuses a `--scorer` that names nothing, before any model is loaded or answer generated."""
    if spec not in ("self", "base") and not Path(spec).is_dir():
        raise UsageError(f"--scorer {spec!r} is neither self, base nor a local model folder.")


def validate(config: TrainConfig) -> None:
    for field in dataclasses.fields(config):
        value, choices = getattr(config, field.name), field.metadata["choices"]
        if choices and value not in choices:
            raise UsageError(f"{flag(field)} must be {', '.join(choices[:-1])} or {choices[-1]}, not {value!r}.")
        for number in value if isinstance(value, tuple) else (value,):  # each of a tuple's (--split 5 14 23)
            limits = out_of_range(number, field.metadata) if isinstance(number, (int, float)) else ""
            if limits:
                raise UsageError(f"{flag(field)} must be {limits}, not {number:g}.")
    if (config.image_shortest_edge or 0) > (config.image_longest_edge or MAX_EDGE):
        raise UsageError(f"--image-shortest-edge {config.image_shortest_edge} is longer than --image-longest-edge "
                         f"{config.image_longest_edge}.")
    if config.validation_fraction + config.test_fraction >= 1:
        raise UsageError(f"--validation-fraction {config.validation_fraction:g} and --test-fraction "
                         f"{config.test_fraction:g} hold out everything; together they must stay below 1.")
    if config.optimizer == "adamw8bit" and config.optimizer_offload != "none":
        raise UsageError("--optimizer adamw8bit keeps its moments on the GPU; --optimizer-offload cpu keeps fp32 "
                         "moments in host memory instead: choose one.")
    if config.quant == "nf4" and config.adapter == "none":
        raise UsageError("an NF4 base cannot be fully fine-tuned (4-bit weights take no gradient); use an adapter.")
    if (config.gpus or 1) > 1 and config.parallel == "none":
        raise UsageError(f"approach {config.approach!r} runs on one device; --gpus {config.gpus} needs a parallel "
                         "approach.")
    if (config.stages is None) == (config.parallel == "pipeline+fsdp"):
        raise UsageError("--parallel pipeline+fsdp needs --stages S (S stages of N/S ranks each)."
                         if config.stages is None else
                         "--stages is for --parallel pipeline+fsdp; --parallel pipeline has one stage per rank.")
    if config.stages and config.gpus and config.gpus % config.stages:
        raise UsageError(f"--gpus {config.gpus} cannot form --stages {config.stages} of equal size; give a multiple.")
    uneven = config.micro_batches < 1 or config.batch_size % config.micro_batches
    if config.parallel.startswith("pipeline") and uneven:
        raise UsageError(f"--micro-batches {config.micro_batches} must divide --batch-size {config.batch_size}.")
    if config.select_by != "val_loss" and config.final == "last":
        raise UsageError(f"--select-by {config.select_by} chooses the best checkpoint for --final best; with --final "
                         "last it would answer rows at every evaluation point for nothing: drop one of them.")
    changed = [flag(field) for field in dataclasses.fields(config)
               if field.name.startswith("fsdp_") and getattr(config, field.name) != field.default]
    if changed and "fsdp" not in config.parallel:
        raise UsageError(f"{changed[0]} is for runs sharded by FSDP (--parallel fsdp or pipeline+fsdp); this run "
                         f"has --parallel {config.parallel}, so it would change nothing: drop it.")
    if config.compile and config.attn_implementation == "flash_attention_2":
        # transformers unpads a padded batch for flash-attn by reading its lengths on the host (nonzero, .item()),
        # which no single graph holds: the first compiled decoder layer would fail the first step (engine/compile.py).
        raise UsageError("--compile compiles each layer as one graph, which flash_attention_2's unpadding cannot be "
                         "(it reads the batch's lengths on the host); use --attn-implementation sdpa with --compile.")
    if config.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        # transformers would fail only once the model loads, after the data set was read and checked.
        raise UsageError("--attn-implementation flash_attention_2 needs the flash-attn package, which is not installed "
                         "here: pip install flash-attn (CUDA only), or use sdpa.")
    check_scorer(config.scorer)
