"""One frozen TrainConfig per run: an approach preset plus the user's overrides.

An approach is not a code path but three choices -- adapter, base-weight format, parallelism --
so hybrids are flag combinations. `validate` refuses what cannot work before anything runs.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UsageError

# name -> (adapter, quant, parallel, one line for --help)
APPROACHES: dict[str, tuple[str, str, str, str]] = {
    "lora": ("lora", "none", "none", "LoRA adapters on a bf16 base, one device (the default)"),
    "qlora": ("lora", "nf4", "none", "LoRA adapters on an NF4 4-bit base, one device"),
    "lora_ddp": ("lora", "none", "ddp", "LoRA, data parallel over --gpus ranks"),
    "full": ("none", "none", "none", "full fine-tuning, fp32 master weights, one device"),
    "full_mp": ("none", "none", "pipeline", "full fine-tuning, layers split across --gpus ranks, micro-batch pipeline"),
    "full_fsdp": ("none", "none", "fsdp", "full fine-tuning, fully sharded over --gpus ranks"),
}

# What this build can run; the rest are listed in --help and refused, never run as something else.
AVAILABLE = {(adapter, quant, parallel) for adapter, quant in (("none", "none"), ("lora", "none"), ("lora", "nf4"))
             for parallel in ("none", "ddp")} | {("none", "none", "fsdp"), ("lora", "none", "fsdp"), ("none", "none", "pipeline")}


@dataclass(frozen=True)
class TrainConfig:
    approach: str = "lora"
    adapter: str = "none"
    quant: str = "none"
    parallel: str = "none"
    model: str = "auto"  # "tiny", a local folder or a hub id; "auto": tiny on CPU, idefics2-8b on CUDA
    dataset: str = "musequest"
    output_dir: str = ""
    limit_exhibits: int | None = None
    # optimisation: the original project's settings
    epochs: int = 3
    max_steps: int | None = None
    stop_after_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    lr_scaling: str = "none"  # none | sqrt | linear in global batch / lr_reference_batch (the original's DDP choices)
    lr_reference_batch: int = 4  # the global batch --lr was tuned for: the original's one-GPU batch
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    train_modules: tuple[str, ...] = ("projections",)
    activation_checkpointing: bool = False
    # pipeline (full_mp)
    micro_batches: int = 4
    schedule: str = "gpipe"  # gpipe | 1f1b
    split: tuple[int, ...] = ()  # first decoder layer of each stage after the first; () = balanced
    # LoRA: the original project's settings
    lora_target: tuple[str, ...] = ("projections",)
    lora_r: int = 8
    lora_alpha: float = 64
    lora_dropout: float = 0.1
    lora_rslora: bool = True
    lora_init: str = "gaussian"
    # QLoRA
    quant_keep_vision: bool = False  # keep the vision encoder in bf16 instead of NF4
    # data and processor
    max_length: int | None = None
    image_splitting: bool = False
    image_shortest_edge: int | None = None
    image_longest_edge: int | None = None
    # runtime
    seed: int = 0
    device: str = "auto"
    gpus: int | None = None  # ranks; None: what torchrun started, else 1
    attn_implementation: str = "sdpa"
    # evaluation, checkpoints, outputs
    eval_every: float = 0.05  # fraction of the total steps
    skip_eval: bool = False  # no generation and scoring of the test split after training
    scorer: str = "base"  # self | base | a model folder: whose embeddings score the answers
    max_new_tokens: int = 512
    keep_last: int = 2
    final: str = "best"  # "best" (lowest validation loss) or "last"
    resume: bool = False
    tensorboard: bool = False
    tensorboard_port: int = 6006

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.approach}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


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
    choice = (config.adapter, config.quant, config.parallel)
    if config.quant == "nf4" and config.adapter == "none":
        raise UsageError("an NF4 base cannot be fully fine-tuned (4-bit weights take no gradient); use an adapter.")
    if config.quant == "nf4" and config.parallel == "fsdp":
        raise UsageError("an NF4 base cannot be sharded by FSDP (its packed weights and quant state are not "
                         "flat fp tensors); use --parallel ddp for QLoRA on several GPUs.")
    if config.parallel == "pipeline+fsdp":
        raise UsageError("pipeline stages sharded with FSDP (--parallel pipeline+fsdp) are not built yet; "
                         "use --parallel pipeline or --parallel fsdp.")
    if config.parallel == "pipeline" and config.adapter != "none":
        raise UsageError("the pipeline runs full fine-tuning only in this build; LoRA and QLoRA use --parallel ddp or fsdp.")
    if choice not in AVAILABLE:
        what = f"approach {config.approach!r}" if choice == APPROACHES[config.approach][:3] else \
            f"--adapter {config.adapter} --quant {config.quant} --parallel {config.parallel}"
        raise UsageError(f"{what} is not available yet in this build; available approaches: "
                         f"{', '.join(n for n, a in APPROACHES.items() if a[:3] in AVAILABLE)}, each also with --parallel ddp, "
                         "and lora with --parallel fsdp.")
    if (config.gpus or 1) > 1 and config.parallel == "none":
        raise UsageError(f"approach {config.approach!r} runs on one device; --gpus {config.gpus} needs a parallel approach.")
    if config.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {config.device!r}.")
    if config.lr_scaling not in ("none", "sqrt", "linear"):
        raise UsageError(f"--lr-scaling must be none, sqrt or linear, not {config.lr_scaling!r}.")
    if config.lora_init not in ("gaussian", "kaiming"):
        raise UsageError(f"--lora-init must be gaussian or kaiming, not {config.lora_init!r}.")
    if config.lora_r < 1:
        raise UsageError("--lora-r must be at least 1.")
    if config.final not in ("best", "last"):
        raise UsageError(f"--final must be 'best' or 'last', not {config.final!r}.")
    for name in ("batch_size", "grad_accum", "epochs", "keep_last", "gpus", "lr_reference_batch"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1.")
    if config.schedule not in ("gpipe", "1f1b"):
        raise UsageError(f"--schedule must be gpipe or 1f1b, not {config.schedule!r}.")
    if config.parallel == "pipeline" and (config.micro_batches < 1 or config.batch_size % config.micro_batches):
        raise UsageError(f"--micro-batches {config.micro_batches} must divide --batch-size {config.batch_size}.")
    check_scorer(config.scorer)
    if config.max_steps is not None and config.max_steps < 1:
        raise UsageError("--max-steps must be at least 1.")
    if not 0 < config.eval_every <= 1:
        raise UsageError("--eval-every is a fraction of the total steps, in (0, 1].")
