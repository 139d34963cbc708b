"""The other side of every comparison: the same work done with the tools users pick instead.

Each peer starts from the same weights as ours (`models.load` of the same spec and seed), trains
the same parameters with the same AdamW settings on the same batches, and clips at the same norm:

- lora: transformers + PEFT (`get_peft_model`, the same r, alpha, dropout, rsLoRA and target paths),
  the model's own loss (`labels=`), as an HF Trainer loop does;
- qlora: every linear our QLoRA quantizes replaced by bitsandbytes' `Linear4bit` (NF4, block 64,
  double-quantized), then PEFT LoRA on it, without `prepare_model_for_kbit_training` (it would add
  gradient checkpointing, which ours does not do);
- full: the plain transformers model, the same projections trainable;
- lora_ddp: the PEFT model in torch's `DistributedDataParallel`;
- full_fsdp: torch's FSDP2 (`fully_shard` on every block of `models.blocks`, then the root), with
  activation checkpointing on the blocks, since ours recomputes every block too;
- full_mp: `torch.distributed.pipelining` (`ScheduleGPipe`, as many micro-batches as ours) over the
  very same `Stage` modules, through the adapter of bench/pipeline_vs_torch.py.

A case with an option (bench/ours.py OPTIONS) changes its approach's peer as users would, read
off the config:

- +bf16 (`precision` bf16): the whole model in bf16, trained weights too, under bf16 autocast, and
  torch's AdamW on the bf16 weights (bf16 moments, every update rounded to nearest): plain bf16
  training, as the original project did;
- +adamw8bit (`optimizer` adamw8bit): bitsandbytes' `AdamW8bit` with `min_8bit_size=0`, so that,
  as ours, every tensor's moments are 8-bit;
- +checkpointing (`activation_checkpointing`): transformers' own `activation_checkpointing_enable`
  (non-reentrant; `gradient_checkpointing_enable` before transformers 5) on the (PEFT) model, as
  HF Trainer does for `activation_checkpointing=True`. It checkpoints the vision encoder's and the
  decoder's layers (only the decoder's keep anything for backward here: nothing in vision trains)
  but not the connector's modality projection and perceiver layers, which ours recomputes too.

Every peer's AdamW groups are the engine's (engine/optim.py `adamw`): 1-D weights do not decay.
"""

import torch
import torch.nn as nn
from transformers import PreTrainedModel

import models
from engine.activation_checkpoint import apply_activation_checkpointing
from engine.build import mark_trainable
from engine.config import TrainConfig
from engine.loss import answer_token_count, logits_loss
from engine.optim import decay_groups
from engine.runtime import Runtime
from measure import Batches, Contender
from models.stages import split_points, stage

NAMES = {
    "lora": "transformers + PEFT LoRA",
    "qlora": "bitsandbytes Linear4bit + PEFT LoRA",
    "full": "transformers, plain loop",
    "lora_ddp": "PEFT LoRA in torch DDP",
    "full_fsdp": "torch FSDP2 + checkpointing",
    "full_mp": "torch.distributed.pipelining GPipe",
}


def peer_name(config: TrainConfig) -> str:
    """The peer of `config` in words: its approach's peer, and what the case's option changes."""
    return (NAMES[config.approach] + (", all bf16 + torch AdamW" if config.precision == "bf16" else "")
            + (" + bitsandbytes AdamW8bit" if config.optimizer == "adamw8bit" else "")
            + (" + HF gradient checkpointing" if config.activation_checkpointing else ""))


def peer_contender(config: TrainConfig, runtime: Runtime) -> Contender:
    """The peer of `config.approach`, as its users would write it."""
    model, _ = models.load(config.model, runtime.precision.frozen_dtype, runtime.device, seed=config.seed)
    model.train()
    if config.approach == "full_mp":
        return _pipelining(model, config, runtime)
    if config.adapter == "lora":
        if config.quant == "nf4":
            _bnb_quantize(model, runtime.device)
        model = _peft(model, config)
    else:
        mark_trainable(model, config.train_modules)
    if config.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trained = model
    if config.parallel == "ddp":
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[runtime.device] if runtime.device.type == "cuda"
                                                      else None)
    elif config.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        apply_activation_checkpointing(models.blocks(model))
        for block in models.blocks(model):
            fully_shard(block)
        fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _adamw(params, config)

    def step(batches: Batches) -> None:
        for batch in batches:
            with runtime.precision.autocast(runtime.device):
                loss = trained(**{k: v.to(runtime.device) for k, v in batch.items()}, use_cache=False).loss
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()

    return Contender(model, optimizer, step)


def _adamw(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """torch's AdamW, or bitsandbytes' AdamW8bit for --optimizer adamw8bit, in the engine's groups."""
    groups = decay_groups(params, config.weight_decay)
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=config.lr, betas=config.betas, min_8bit_size=0)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def _peft(model: PreTrainedModel, config: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = models.matching_modules(model, list(config.lora_target), kind=_linear_kinds())
    lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             use_rslora=config.lora_rslora, target_modules=targets, init_lora_weights="gaussian")
    return get_peft_model(model, lora_config)


def _linear_kinds() -> tuple[type[nn.Module], ...]:
    import bitsandbytes as bnb

    return nn.Linear, bnb.nn.Linear4bit


def _bnb_quantize(model: PreTrainedModel, device: torch.device) -> None:
    """Every exact nn.Linear but lm_head becomes a bitsandbytes NF4 Linear4bit, as our `quantize` does."""
    import bitsandbytes as bnb

    for path, linear in [(p, m) for p, m in model.named_modules() if type(m) is nn.Linear and p != "lm_head"]:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=linear.weight.dtype, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, layer.to(device))  # Params4bit quantizes when moved


def _pipelining(model: PreTrainedModel, config: TrainConfig, runtime: Runtime) -> Contender:
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from pipeline_vs_torch import FIRST_INPUTS, KEYWORD_INPUTS, TorchAdapter

    mark_trainable(model, config.train_modules)
    own = stage(model, split_points(model, runtime.world_size, config.split), runtime.rank, logits_loss)
    own.to(runtime.device)
    pipe_stage = PipelineStage(TorchAdapter(own), runtime.rank, runtime.world_size, runtime.device)
    divisor = [1]  # the answer tokens of the step's whole batch, set by each step

    schedule = ScheduleGPipe(pipe_stage, config.micro_batches, loss_fn=lambda loss, _target: loss / divisor[0],
                             scale_grads=False)
    params = [p for p in own.parameters() if p.requires_grad]
    optimizer = _adamw(params, config)

    def step(batches: Batches) -> None:
        for batch in batches:
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
            divisor[0] = answer_token_count(batch["labels"])
            inputs = tuple(batch[key] for key in FIRST_INPUTS) if pipe_stage.is_first else ()
            targets = {"target": batch["labels"]} if pipe_stage.is_last else {}
            with runtime.precision.autocast(runtime.device):
                schedule.step(*inputs, **{key: batch[key] for key in KEYWORD_INPUTS}, **targets, return_outputs=False)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)  # per stage: torch has no global clip
        optimizer.step()

    return Contender(own, optimizer, step)
