"""Named sets of module paths, as regular expressions over `named_modules()` paths.

Only this file knows Idefics2's module layout (transformers 5.x); LoRA injection and the
choice of what full fine-tuning trains both take these patterns. Bare names like `q_proj`
would also match the vision encoder and the perceiver: every preset anchors on the parent.
"""

import re

import torch.nn as nn

from errors import UsageError

_PROJECTIONS = r"(q|k|v|o|gate|up|down)_proj"

PRESETS: dict[str, str] = {
    # The original project's choice for both LoRA and full fine-tuning: every attention and MLP
    # projection of the text model and of the connector (modality projection + perceiver).
    "projections": rf"^model\.(text_model|connector)\..*\.{_PROJECTIONS}$",
    "text": rf"^model\.text_model\..*\.{_PROJECTIONS}$",
    "connector": rf"^model\.connector\..*\.{_PROJECTIONS}$",
    "vision": r"^model\.vision_model\.encoder\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$",
    "all-linear": r"^model\..*",  # every linear layer except lm_head
    # The output head: on a random-weight tiny model it is what must learn the vocabulary first.
    "lm_head": r"^lm_head$",
}


def resolve(patterns: list[str]) -> list[str]:
    """Expand preset names; anything else is taken as a regular expression."""
    return [PRESETS.get(p, p) for p in patterns]


# What QLoRA leaves in bf16 besides the embeddings (which are not linear layers): the output head,
# and on request the vision encoder.
QUANT_SKIP = [r"^lm_head$"]
VISION_ENCODER = r"^model\.vision_model\."


def matching_modules(model: nn.Module, patterns: list[str],
                     kind: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear) -> list[str]:
    """Paths of `kind` modules (linear layers) that match any pattern; a pattern that matches nothing is an error."""
    compiled = []
    for pattern in resolve(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise UsageError(f"target pattern {pattern!r} is not a valid regular expression: {error}") from error
    paths = [name for name, module in model.named_modules() if isinstance(module, kind)]
    for pattern, regex in zip(patterns, compiled, strict=True):
        if not any(regex.search(path) for path in paths):
            raise UsageError(
                f"target {pattern!r} matches no linear layer in the model; "
                f"presets are {', '.join(PRESETS)}, or give a regular expression over paths like {paths[0]!r}."
            )
    return [path for path in paths if any(regex.search(path) for regex in compiled)]
