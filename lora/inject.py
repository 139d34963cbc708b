"""Put LoRA adapters into a model at given module paths, and take them out again.

The caller chooses the paths (for Idefics2, `models.targets.matching_modules`); this file only
knows `nn.Module`. Adapter tensors keep their module's path: `<path>.lora_A.weight`.
"""

from collections.abc import Iterator

import torch
import torch.nn as nn

from lora.lora_linear import LoRALinear


def inject(model: nn.Module, paths: list[str], r: int = 8, alpha: float = 64, dropout: float = 0.1,
           rslora: bool = True, init: str = "gaussian") -> list[str]:
    """Wrap the module at each path in a LoRALinear and freeze everything but the adapters."""
    if not paths:
        raise ValueError("inject needs at least one module path")
    model.requires_grad_(False)
    for path in paths:
        base = model.get_submodule(path)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} already has a LoRA adapter")
        model.set_submodule(path, LoRALinear(base, r, alpha, dropout, rslora, init))
    return list(paths)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: module for path, module in model.named_modules() if isinstance(module, LoRALinear)}


def base_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of `model`, each LoRALinear replaced by the layer it wraps (which is not a child)."""
    for module in model.modules():
        yield module.base if isinstance(module, LoRALinear) else module


def merge(model: nn.Module) -> None:
    for module in lora_modules(model).values():
        module.merge()


def unmerge(model: nn.Module) -> None:
    for module in lora_modules(model).values():
        module.unmerge()


def merge_and_unload(model: nn.Module) -> list[str]:
    """Fold every adapter into its base and put the base back: a plain model, for export."""
    modules = lora_modules(model)
    for path, module in modules.items():
        module.merge()
        model.set_submodule(path, module.base)
    return list(modules)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under the model's own names (`<path>.lora_A.weight`, ...)."""
    return {f"{path}.{name}": tensor.detach()
            for path, module in lora_modules(model).items()
            for name, tensor in (("lora_A.weight", module.lora_A.weight), ("lora_B.weight", module.lora_B.weight))}
