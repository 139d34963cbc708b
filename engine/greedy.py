"""Greedy answers to rows' prompts: the one decoding that evaluation (eval/generate.py) and the choice of the
best checkpoint by its answers (engine/select.py) share, so that a checkpoint is chosen by the answers it will
give when evaluated.

Each prompt is the row's dialog up to its last assistant turn, left-padded (engine/data/prompts.py),
so the new tokens are the columns after it; only those are decoded (R7, R8). Decoding stops at `</s>` or
`<end_of_utterance>` and may never emit an image token, which only the processor may place: the stop
and ban lists of Idefics2-8B's generation_config.json, passed explicitly because a model built
from a bare config (or a saved fine-tune) may not carry them.

A forward that keeps no cache (a pipeline's stages) decodes by `answer_by_steps` instead, the same choices
made by hand: the whole sequence again for every new token, a row at a time.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

from engine.data.prompts import prompt_batch

# A batch of one row's whole sequence so far -> the greedy next token of its last position, a (1,) tensor.
NextToken = Callable[[dict[str, torch.Tensor]], torch.Tensor]

STOP_TOKENS = ["</s>", "<end_of_utterance>"]
IMAGE_TOKENS = ["<image>", "<fake_token_around_image>"]


def answer_rows(model: PreTrainedModel, processor: ProcessorMixin, rows: list[dict], max_new_tokens: int,
                device: torch.device, synced: bool = False) -> list[str]:
    """Each row's answer: its new tokens, decoded without special tokens. `synced`: see `generate_ids`."""
    _, new_ids = generate_ids(model, processor, rows, max_new_tokens, device, synced)
    return [answer.strip() for answer in processor.batch_decode(new_ids, skip_special_tokens=True)]


@torch.no_grad()
def generate_ids(model: PreTrainedModel, processor: ProcessorMixin, rows: list[dict], max_new_tokens: int,
                 device: torch.device, synced: bool = False) -> tuple[BatchFeature, torch.Tensor]:
    """The left-padded prompt batch, and the token ids generated after it (padded after a stop).

    `synced`: the model's forward is a collective (FSDP's gathers), so every rank of the default process group
    calls this together and runs as many forwards: one that has finished runs on, discarding them, until all
    have (transformers' synced_gpus, an all-reduce of "finished" per token)."""
    inputs = prompt_batch(processor, rows).to(device)
    tokenizer = processor.tokenizer
    # Eager even under --compile (engine/compile.py): a block that reads and grows the cache would be compiled
    # again for every layer and every length, past torch.compile's limit.
    with torch.compiler.set_stance("force_eager"):
        output = model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
            eos_token_id=tokenizer.convert_tokens_to_ids(STOP_TOKENS),
            bad_words_ids=[[token] for token in tokenizer.convert_tokens_to_ids(IMAGE_TOKENS)],
            pad_token_id=tokenizer.pad_token_id, synced_gpus=synced,
        )
    return inputs, output[:, inputs["input_ids"].shape[1] :]


def answer_by_steps(next_token: NextToken, processor: ProcessorMixin, row: dict, max_new_tokens: int,
                    device: torch.device, synced: bool = False) -> str:
    """`row`'s answer as `answer_rows` gives it, from `next_token`, which sees the prompt and the tokens so far
    (no padding: one row). `synced`: as in `generate_ids`, every rank of the default group calls this together
    and runs as many steps."""
    inputs = dict(prompt_batch(processor, [row]).to(device))
    stops = processor.tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    ids, answer, finished = inputs["input_ids"], [], False
    for _ in range(max_new_tokens):
        token = next_token(dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids)))
        if not finished:
            answer.append(int(token))
            finished = answer[-1] in stops
        if everyone_finished(finished, synced, device):
            break
        ids = torch.cat([ids, token.view(1, 1).to(ids.dtype)], dim=1)
    return processor.decode(answer, skip_special_tokens=True).strip()


def greedy_token(logits: torch.Tensor, processor: ProcessorMixin) -> torch.Tensor:
    """Each row's greedy choice from its last position's `logits` (rows, vocabulary), never an image token:
    generate's ban (-inf) and argmax."""
    scores = logits.to(torch.float32, copy=True)
    scores[:, processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKENS)] = -torch.inf
    return scores.argmax(dim=-1)


def everyone_finished(finished: bool, synced: bool, device: torch.device) -> bool:
    """Whether this rank (`synced`: every rank, by an all-reduce of the ones still going) has finished."""
    if not synced:
        return finished
    going = torch.tensor([0 if finished else 1], dtype=torch.int64, device=device)
    dist.all_reduce(going)
    return int(going) == 0
