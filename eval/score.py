"""How far a generated answer is from the reference: 1 - cosine of contextual embeddings (0 same, 2 opposite).

Faithful mode (`batched=False`) is the original MuseQuest score, `calculate_semantic_similarity_score`
in Gefu-Xu/MuseQuest `my_utils.py`: each text alone, tokenized as the processor does for text only
(BOS added; no image, no chat template), goes through the model being scored; its last hidden layer
(`hidden_states[-1]`, which is after the final norm in transformers 4.46 and in 5.x alike) is
averaged over all tokens, and the score is `1.0 - cosine` computed in the model's own dtype (bf16
on a GPU, which is why the original's per-row scores are coarse binary fractions such as 0.0234375).
We take that hidden state from the text decoder directly (`get_decoder()`, which is the decoder
itself when a judge is given as one), the same tensor without the vocabulary logits; a test checks
the two agree.

With `--scorer self` every approach is measured by its own fine-tuned weights, so two approaches'
scores come from different rulers. Fair mode (`batched=True`) is meant for one fixed judge (the base
model by default, loaded by `load_judge`): texts go in batches and pooling averages the real tokens
only, in fp32, so neither padding nor which texts share a batch changes a score beyond float rounding.

The judge is the model's text decoder alone (models/lazy.py: no vision encoder, connector or lm_head,
2.4 GiB less for the 8B), in the run's compute dtype (bf16 on a GPU, fp32 on the CPU): 13.2 GiB for the
8B in bf16, where the whole model in fp32 took 31.3. On the tiny model over
the original's 1,554 result rows, a bf16 judge moves a row's score by at most 0.006 (0.0007-0.0015
on average) and a file's mean score by at most 0.0023 against an fp32 judge: under one step of the
original's own bf16 scores (2^-7 for scores in [1, 2)); tests/unit/eval/test_eval.py holds it to that.

A fixed judge's embeddings are cached on disk (eval/embedding_cache.py): a text it has embedded before is read
back, not embedded again.
"""

from collections.abc import Callable

import torch
import torch.nn as nn
from transformers import PreTrainedTokenizerBase

from engine.config import check_scorer
from eval.embedding_cache import EmbeddingCache
from models.lazy import load_text_model


def similarity_scores(model: nn.Module, tokenizer: PreTrainedTokenizerBase, generated: list[str],
                      truth: list[str], *, batched: bool, batch_size: int = 8, device: torch.device,
                      progress: Callable[[int], object] = lambda texts: None,
                      cache: EmbeddingCache | None = None) -> list[float]:
    """One score per (generated, truth) pair; `batched` picks fair mode, else the original's. `progress` is
    told how many texts each forward pass embedded (twice the pairs in all); a fixed judge's `cache` gives
    the texts it has seen before without a forward pass."""
    return distances(*pair_embeddings(model, tokenizer, generated, truth, batched=batched, batch_size=batch_size,
                                      device=device, progress=progress, cache=cache))


@torch.no_grad()
def pair_embeddings(model: nn.Module, tokenizer: PreTrainedTokenizerBase, generated: list[str], truth: list[str], *,
                    batched: bool, batch_size: int = 8, device: torch.device,
                    progress: Callable[[int], object] = lambda texts: None,
                    cache: EmbeddingCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings of the answers and of the references, (rows, hidden) each: the original's in the model's
    own dtype, the fair judge's in fp32."""
    if len(generated) != len(truth):
        raise ValueError(f"{len(generated)} generated answers for {len(truth)} references")
    if not generated:  # a rank whose share of a small test split is empty
        return torch.empty(0, 0), torch.empty(0, 0)
    if not batched:
        return (torch.cat([_mean_embedding(model, tokenizer, text, device, progress) for text in generated]),
                torch.cat([_mean_embedding(model, tokenizer, text, device, progress) for text in truth]))
    texts = [*generated, *truth]
    known = {} if cache is None else {text: cache.get(text) for text in set(texts)}
    missing = sorted(text for text, embedding in known.items() if embedding is None) if cache is not None else texts
    progress(len(texts) - len(missing))
    computed = _masked_mean_embeddings(model, tokenizer, missing, batch_size, device, progress) if missing else []
    if cache is not None:
        for text, embedding in zip(missing, computed, strict=True):
            known[text] = embedding.cpu()
            cache.add(text, embedding)
        cache.save()
        embeddings = torch.stack([known[text] for text in texts])
    else:
        embeddings = computed
    return embeddings[: len(generated)], embeddings[len(generated) :]


def distances(answers: torch.Tensor, references: torch.Tensor) -> list[float]:
    """1 - cosine of each answer and its reference, in the embeddings' dtype (the original's bf16 on a GPU)."""
    return [_distance(answer[None], reference[None]) for answer, reference in zip(answers, references, strict=True)]


def load_judge(spec: str, base_spec: str, device: torch.device,
               dtype: torch.dtype) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The fixed judge of `--scorer`: "base" (`base_spec`, the model every approach starts from) or a local
    Hugging Face folder, in `dtype` (the run's compute dtype): its text decoder alone, which is all a score
    reads. `--scorer self` has no judge to load: the evaluated model scores its own answers."""
    check_scorer(spec)
    decoder, processor = load_text_model(base_spec if spec == "base" else spec, dtype, device)
    return decoder.eval(), processor.tokenizer


def _distance(answer: torch.Tensor, reference: torch.Tensor) -> float:
    return float(1.0 - torch.cosine_similarity(answer, reference, dim=1).mean())


def _last_hidden_state(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _mean_embedding(model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str,
                    device: torch.device, progress: Callable[[int], object]) -> torch.Tensor:
    inputs = tokenizer(text, return_tensors="pt").to(device)
    embedding = _last_hidden_state(model, inputs["input_ids"], inputs["attention_mask"]).mean(dim=1)
    progress(1)
    return embedding


def _masked_mean_embeddings(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                            batch_size: int, device: torch.device, progress: Callable[[int], object]) -> torch.Tensor:
    pooled = []
    for start in range(0, len(texts), batch_size):
        # Right padding: causal attention keeps real tokens from seeing the pads after them, they keep
        # their unbatched positions, and no query row is all masked out (a NaN there would poison the
        # pooled sum below even at zero weight).
        inputs = tokenizer(texts[start : start + batch_size], padding=True, padding_side="right",
                           return_tensors="pt").to(device)
        hidden = _last_hidden_state(model, inputs["input_ids"], inputs["attention_mask"]).float()
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        pooled.append((hidden * mask).sum(dim=1) / mask.sum(dim=1))
        progress(len(inputs["input_ids"]))
    return torch.cat(pooled)
