"""A fixed judge's embeddings are computed once per text and read back the next time: the scores are the uncached
ones, the judge's forward passes count only the texts it had not seen, and another judge, or a damaged file, is
never read."""

import pytest
import torch

from eval.embedding_cache import EmbeddingCache
from eval.score import similarity_scores
from models.tiny import build_tiny

CPU = torch.device("cpu")
REFERENCES = ["The 1903 Wright Flyer, the first powered airplane.", "A silver decadrachm of Syracuse.",
              "Helen Keller's pocket watch, read by touch."]
ANSWERS = ["A plane from 1903.", "A coin.", "A watch."]


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSEFT_CACHE", str(tmp_path))
    return tmp_path / "embeddings"


def embedded_texts(judge: torch.nn.Module) -> list[int]:
    """The number of texts of each forward pass of `judge`'s decoder, appended as they run."""
    texts = []
    judge.get_decoder().register_forward_hook(
        lambda module, args, kwargs, output: texts.append(len(kwargs["input_ids"])), with_kwargs=True)
    return texts


def scores(judge, processor, answers, references, cache=None) -> list[float]:
    return similarity_scores(judge, processor.tokenizer, answers, references, batched=True, batch_size=2, device=CPU,
                             cache=cache)


def test_each_text_is_embedded_once_per_judge(processor, cache_folder):
    judge = build_tiny(0).eval()
    uncached = scores(judge, processor, ANSWERS, REFERENCES)
    passes = embedded_texts(judge)
    first = scores(judge, processor, ANSWERS + ANSWERS[:1], REFERENCES + REFERENCES[:1], EmbeddingCache(judge))
    assert sum(passes) == 6  # six distinct texts of eight, the repeated row's two embedded once
    assert first == pytest.approx(uncached + uncached[:1], abs=1e-6)
    passes.clear()
    later = scores(judge, processor, ["A glider."], REFERENCES[:1], EmbeddingCache(judge))  # another run's answer
    assert passes == [1]  # the answer alone: the reference was embedded by the first run
    assert later == pytest.approx(scores(judge, processor, ["A glider."], REFERENCES[:1]), abs=1e-6)
    assert len(list(cache_folder.glob("*.safetensors"))) == 1


def test_another_judge_or_a_damaged_file_is_not_read(processor, cache_folder):
    first, second = build_tiny(0).eval(), build_tiny(1).eval()
    scores(first, processor, ANSWERS, REFERENCES, EmbeddingCache(first))
    passes = embedded_texts(second)
    assert scores(second, processor, ANSWERS, REFERENCES, EmbeddingCache(second)) == pytest.approx(
        scores(second, processor, ANSWERS, REFERENCES), abs=1e-6)
    assert sum(passes) == 2 * 6  # all six texts, cached (once) and uncached (once): nothing of the first judge's
    assert len(list(cache_folder.glob("*.safetensors"))) == 2
    stored = EmbeddingCache(first).path
    stored.write_bytes(stored.read_bytes()[:40])  # cut short
    expected = scores(first, processor, ANSWERS, REFERENCES)
    passes = embedded_texts(first)
    assert scores(first, processor, ANSWERS, REFERENCES, EmbeddingCache(first)) == pytest.approx(expected, abs=1e-6)
    assert sum(passes) == 6  # every text again
    assert EmbeddingCache(first).get(ANSWERS[0]) is not None  # and the file rewritten whole
