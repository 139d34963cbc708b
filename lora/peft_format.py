"""Adapter folders in PEFT's on-disk format, so `PeftModel.from_pretrained(base, folder)` loads
ours and `load` takes one PEFT wrote.

A folder holds `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.lora_A.weight`: PEFT's wrapper prefix, adapter name stripped.
"""

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from errors import UsageError
from lora.inject import adapter_state_dict, inject, lora_modules

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT features that change the computation; LoRALinear does none of them, so a folder that asks
# for one (a value other than off/empty) is refused rather than loaded wrongly.
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save",
               "layers_to_transform", "exclude_modules", "target_parameters", "layer_replication", "use_qalora")
# Other PEFT inits (PiSSA, OLoRA, LoftQ, ...) also rewrite the base weights; only these leave them alone.
PLAIN_INITS = {True: "kaiming", False: "gaussian", "gaussian": "gaussian"}


def save(model: nn.Module, directory: str | Path, *, base_model_name_or_path: str,
         target_modules: list[str] | str | None = None, adapter: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters; r, alpha, dropout, rsLoRA and init are read from its LoRALinears.
    `adapter` gives the tensors (`<path>.lora_A.weight`, ...) when the modules do not hold them whole,
    as under FSDP; by default they are the modules' own.

    `target_modules` goes into the config as PEFT would read it (a full-match regex, or path
    suffixes); by default the exact wrapped paths. It must select exactly the wrapped modules.
    It writes in place, as PEFT's save_pretrained does; a run writes it into a temporary folder that
    appears whole (engine/outputs/publish.py).
    """
    modules = lora_modules(model)
    settings = {(m.r, m.alpha, getattr(m.dropout, "p", 0.0), m.rslora, m.init) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"a PEFT adapter folder holds one LoRA setting for all modules; this model has {settings}")
    (r, alpha, dropout, rslora, init), = settings
    targets = sorted(modules) if target_modules is None else target_modules
    if set(_peft_targets(model, targets)) != set(modules):
        raise ValueError(f"target_modules {targets!r} would not make PEFT wrap exactly this model's adapters")
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True if init == "kaiming" else "gaussian",
        "inference_mode": True, "use_dora": False, "modules_to_save": None,
    }
    adapter = adapter_state_dict(model) if adapter is None else adapter
    tensors = {PREFIX + name: tensor.cpu().contiguous() for name, tensor in adapter.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load(model: nn.Module, directory: str | Path) -> list[str]:
    """Inject the adapter of a PEFT-format folder into a plain model and load its weights.

    Everything is checked before the model is touched, so a bad folder leaves it as it was.
    """
    directory = Path(directory)
    config = _read_config(directory)
    paths = _peft_targets(model, config["target_modules"])
    if not paths:
        raise UsageError(f"adapter {directory}: its target_modules {config['target_modules']!r} "
                         "match no linear layer of this model.")
    try:
        tensors = {name.removeprefix(PREFIX): tensor for name, tensor in load_file(directory / WEIGHTS).items()}
    except (SafetensorError, OSError) as error:
        raise UsageError(f"adapter {directory}: cannot read {WEIGHTS} ({error}).") from error
    _check_tensors(model, paths, config["r"], tensors, directory)
    inject(model, paths, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
           rslora=config.get("use_rslora", False), init=PLAIN_INITS[config.get("init_lora_weights", True)])
    model.load_state_dict(tensors, strict=False)
    return paths


def _read_config(directory: Path) -> dict:
    missing = [name for name in (CONFIG, WEIGHTS) if not (directory / name).is_file()]
    if missing:
        raise UsageError(f"adapter folder {directory} has no {' or '.join(missing)}.")
    try:
        config = json.loads((directory / CONFIG).read_text())
        required = {key: config[key] for key in ("peft_type", "r", "lora_alpha", "target_modules")}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise UsageError(f"adapter {directory}: {CONFIG} is not a LoRA config ({error!r}).") from error
    asked = [key for key in UNSUPPORTED if config.get(key) not in (None, False, {}, [])]
    if config.get("bias", "none") != "none":
        asked.append("bias")
    if required["peft_type"] != "LORA" or asked or config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise UsageError(f"adapter {directory}: only plain LoRA is supported, its config asks for "
                         f"{asked or 'peft_type ' + str(required['peft_type'])} "
                         f"(init_lora_weights={config.get('init_lora_weights', True)!r}).")
    return config


def _peft_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """The linear-like modules PEFT would wrap: a string is a full-match regex over module
    paths, a list names modules by path suffix."""
    linear = [path for path, module in model.named_modules()
              if hasattr(module, "in_features") and hasattr(module, "out_features")]
    if isinstance(target_modules, str):
        try:
            regex = re.compile(target_modules)
        except re.error as error:
            raise UsageError(f"target_modules {target_modules!r} is not a valid regular expression: {error}") from error
        return [path for path in linear if regex.fullmatch(path)]
    return [path for path in linear if any(path == name or path.endswith("." + name) for name in target_modules)]


def _check_tensors(model: nn.Module, paths: list[str], r: int, tensors: dict[str, torch.Tensor],
                   directory: Path) -> None:
    expected = {}
    for path in paths:
        module = model.get_submodule(path)
        expected[f"{path}.lora_A.weight"] = (r, module.in_features)
        expected[f"{path}.lora_B.weight"] = (module.out_features, r)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise UsageError(f"adapter {directory} does not fit this model: {len(missing)} tensors missing "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}.")
    wrong = [name for name, shape in expected.items() if tuple(tensors[name].shape) != shape]
    if wrong:
        raise UsageError(f"adapter {directory} does not fit this model: {wrong[0]} has shape "
                         f"{tuple(tensors[wrong[0]].shape)}, the model needs {expected[wrong[0]]}.")

