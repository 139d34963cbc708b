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

Issue 18's hybrids (bench/ours.py HYBRIDS) combine those peers as their users would:

- lora_pipe, qlora_pipe: the lora (qlora) peer's model, PEFT LoRA (on bitsandbytes NF4), cut into
  the same stages and run as full_mp's peer;
- qlora_fsdp: the qlora peer in full_fsdp's FSDP2 with checkpointing, its packed 4-bit weights
  stored in the dtype of the model's other weights (`quant_storage`, the FSDP-QLoRA recipe of
  bitsandbytes' and PEFT's docs: FSDP shards float tensors only; fp32 on the CPU, bf16 on a GPU).
  Every rank keeps each layer's whole quant state (absmax), as bitsandbytes does;
- full_pipe_fsdp (`parallel` pipeline+fsdp): the ranks in a (stages, shards) device mesh, each
  stage's blocks and then the stage FSDP2 units over its shards (checkpointed, as full_fsdp's
  peer), in full_mp's GPipe schedule, which syncs FSDP2's gradients on the last micro-batch only;
- full_fsdp+no_prefetch: full_fsdp's peer, FSDP2 as is (it prefetches).

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

Every peer's AdamW groups are the engine's (engine/optim/optimizer.py `adamw`): 1-D weights do not decay.
"""

import torch
import torch.nn as nn
from measure import Batches, Contender
from ours import pipeline_stages
from torch.distributed.device_mesh import DeviceMesh
from transformers import PreTrainedModel

import models
from engine.activation_checkpoint import apply_activation_checkpointing
from engine.build import mark_trainable
from engine.config import TrainConfig
from engine.loss import answer_token_count, logits_loss
from engine.optim.optimizer import decay_groups
from engine.runtime import Runtime
from models.stages import split_points, stage

NAMES = {  # (adapter, quant, parallel) -> the peer in words
    ("lora", "none", "none"): "transformers + PEFT LoRA",
    ("lora", "nf4", "none"): "bitsandbytes Linear4bit + PEFT LoRA",
    ("none", "none", "none"): "transformers, plain loop",
    ("lora", "none", "ddp"): "PEFT LoRA in torch DDP",
    ("none", "none", "fsdp"): "torch FSDP2 + checkpointing",
    ("none", "none", "pipeline"): "torch.distributed.pipelining GPipe",
    ("lora", "none", "pipeline"): "PEFT LoRA on torch.distributed.pipelining GPipe",
    ("lora", "nf4", "pipeline"): "bitsandbytes Linear4bit + PEFT LoRA on torch.distributed.pipelining GPipe",
    ("lora", "nf4", "fsdp"): "bitsandbytes Linear4bit (float storage) + PEFT LoRA in torch FSDP2 + checkpointing",
    ("none", "none", "pipeline+fsdp"): "torch FSDP2 + checkpointing in torch.distributed.pipelining GPipe stages",
}


def peer_name(config: TrainConfig) -> str:
    """The peer of `config` in words: its approach's peer, and what the case's option changes."""
    return (NAMES[config.adapter, config.quant, config.parallel]
            + (", all bf16 + torch AdamW" if config.precision == "bf16" else "")
            + (" + bitsandbytes AdamW8bit" if config.optimizer == "adamw8bit" else "")
            + (" + HF gradient checkpointing" if config.activation_checkpointing else ""))


def peer_contender(config: TrainConfig, runtime: Runtime) -> Contender:
    """The peer of `config`'s adapter, base-weight format and parallelism, as its users would write it."""
    model, _ = models.load(config.model, runtime.precision.frozen_dtype, runtime.device, seed=config.seed)
    model.train()
    trained = _trainable(model, config, runtime)  # what a step calls: the PEFT model, or `model`
    if config.parallel.startswith("pipeline"):
        return _pipelining(model, config, runtime)  # stages of `model`, which PEFT changed in place
    if config.activation_checkpointing:
        trained.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.parallel == "ddp":
        trained = nn.parallel.DistributedDataParallel(trained, device_ids=[runtime.device]
                                                      if runtime.device.type == "cuda" else None)
    elif config.parallel == "fsdp":
        _fsdp2(models.blocks(model), model)
    params = _trained_params(model)
    optimizer = _adamw(params, config)

    def step(batches: Batches) -> None:
        for batch in batches:
            with runtime.precision.autocast(runtime.device):
                loss = trained(**{k: v.to(runtime.device) for k, v in batch.items()}, use_cache=False).loss
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()

    return Contender(model, optimizer, step)


def _fsdp2(blocks: list[nn.Module], root: nn.Module, mesh: DeviceMesh | None = None) -> None:
    """torch's FSDP2 as its users apply it: every block checkpointed (ours recomputes every block too) and its
    own unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    apply_activation_checkpointing(blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)


def _trainable(model: PreTrainedModel, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """`model` with the approach's trained parameters: PEFT LoRA (on bitsandbytes NF4 for QLoRA), which is
    what gets called, or `model` itself with the full fine-tuning's modules trainable."""
    if config.adapter == "none":
        mark_trainable(model, config.train_modules)
        return model
    if config.quant == "nf4":
        # FSDP shards float tensors only: the HF/Answer.AI FSDP+QLoRA recipe packs the 4-bit weights into
        # the dtype of the model's other weights (bnb_4bit_quant_storage = torch_dtype).
        storage = runtime.precision.frozen_dtype if "fsdp" in config.parallel else torch.uint8
        _bnb_quantize(model, runtime.device, storage)
    return _peft(model, config)


def _trained_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


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


def _bnb_quantize(model: PreTrainedModel, device: torch.device, storage: torch.dtype) -> None:
    """Every exact nn.Linear but lm_head becomes a bitsandbytes NF4 Linear4bit, as our `quantize` does, its
    packed weight stored as `storage`. The layer keeps the quant state too (`module=`), where bitsandbytes
    finds it again when FSDP has swapped the weight for a plain tensor."""
    import bitsandbytes as bnb

    for path, linear in [(p, m) for p, m in model.named_modules() if type(m) is nn.Linear and p != "lm_head"]:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=linear.weight.dtype, compress_statistics=True, quant_type="nf4",
                                  quant_storage=storage)
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64, quant_storage=storage, module=layer)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, layer.to(device))  # Params4bit quantizes when moved


def _pipelining(model: PreTrainedModel, config: TrainConfig, runtime: Runtime) -> Contender:
    """This rank's stage of the engine's split, in torch's GPipe schedule. Ranks form a (stages, shards)
    mesh, stage-major as ours; under pipeline+fsdp each stage's blocks and the stage are FSDP2 units over
    its shards, each shard group with its own rows, whose gradients FSDP2 averages."""
    from pipeline_vs_torch import FIRST_INPUTS, KEYWORD_INPUTS, TorchAdapter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    stages = pipeline_stages(config, runtime.world_size)
    mesh = init_device_mesh(runtime.device.type, (stages, runtime.world_size // stages),
                            mesh_dim_names=("stage", "shard"))
    index = mesh.get_local_rank("stage")
    own = stage(model, split_points(model, stages, config.split), index, logits_loss)
    adapter = TorchAdapter(own).to(runtime.device)
    if config.parallel == "pipeline+fsdp":
        members = set(own.modules())
        _fsdp2([block for block in models.blocks(model) if block in members], adapter, mesh["shard"])
    pipe_stage = PipelineStage(adapter, index, stages, runtime.device, group=mesh.get_group("stage"))
    divisor = [1]  # the answer tokens of the step's batch on this shard, set by each step
    schedule = ScheduleGPipe(pipe_stage, config.micro_batches, loss_fn=lambda loss, _target: loss / divisor[0],
                             scale_grads=False)
    params = _trained_params(own)
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
