"""Drafting with a second, smaller GGUF model that shares the main model's vocabulary.

The draft keeps its own KV cache across steps and calls (it only re-evaluates what changed),
drafts greedily, and stops as soon as it is unsure (top probability below ``p_min``): an unsure
draft token is likely rejected, and on a CPU every rejected token costs real verification time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from velollm.errors import IncompatibleDraftModel
from velollm.plugins.llamacpp.runner import LlamaRunner

#: llama.cpp's own speculative example tolerates this much difference in vocabulary size (padding).
MAX_VOCAB_SIZE_DIFFERENCE = 128
SAMPLE_SIZE = 512


@dataclass(frozen=True)
class VocabSummary:
    """What must agree for one model's token ids to mean the same text in the other."""

    name: str
    vocab_type: int
    n_vocab: int
    bos: int
    eos: int
    texts: dict[int, bytes]

    @classmethod
    def of(cls, llama: Any, name: str, ids: Sequence[int] | None = None) -> VocabSummary:
        import llama_cpp

        vocab = llama._model.vocab
        n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        ids = sample_ids(n_vocab) if ids is None else [i for i in ids if 0 <= i < n_vocab]
        return cls(
            name=name,
            vocab_type=int(llama_cpp.llama_vocab_type(vocab)),
            n_vocab=n_vocab,
            bos=int(llama_cpp.llama_vocab_bos(vocab)),
            eos=int(llama_cpp.llama_vocab_eos(vocab)),
            texts={i: bytes(llama_cpp.llama_vocab_get_text(vocab, i) or b"") for i in ids},
        )


def sample_ids(n_vocab: int, size: int = SAMPLE_SIZE) -> list[int]:
    """Token ids spread over the vocabulary, plus its last 64 (where special tokens usually live)."""
    step = max(n_vocab // size, 1)
    ids = set(range(0, n_vocab, step)) | set(range(max(n_vocab - 64, 0), n_vocab))
    return sorted(ids)


def check_compatible(main: VocabSummary, draft: VocabSummary) -> None:
    """Raise :class:`IncompatibleDraftModel` unless ``draft``'s token ids mean what ``main``'s do."""
    problems = []
    if main.vocab_type != draft.vocab_type:
        problems.append(f"tokenizer type {draft.vocab_type} vs {main.vocab_type}")
    if abs(main.n_vocab - draft.n_vocab) > MAX_VOCAB_SIZE_DIFFERENCE:
        problems.append(f"vocabulary size {draft.n_vocab:,} vs {main.n_vocab:,}")
    if main.bos != draft.bos:
        problems.append(f"BOS token {draft.bos} vs {main.bos}")
    if main.eos != draft.eos:
        problems.append(f"EOS token {draft.eos} vs {main.eos}")
    shared = sorted(set(main.texts) & set(draft.texts))
    differing = [i for i in shared if main.texts[i] != draft.texts[i]]
    if differing:
        i = differing[0]
        problems.append(f"{len(differing)} of {len(shared)} sampled token texts differ "
                        f"(e.g. id {i}: {draft.texts[i]!r} vs {main.texts[i]!r})")
    if problems:
        raise IncompatibleDraftModel(
            f"{draft.name} cannot draft for {main.name}: their vocabularies differ ({'; '.join(problems)}). "
            "A draft model must come from the same model family (same tokenizer).",
            main=main.name, draft=draft.name, problems=problems,
        )


class DraftModel:
    """A loaded draft model (a velollm engine we own) driven through the low-level API."""

    def __init__(self, engine: Any, p_min: float = 0.5) -> None:
        self.engine = engine
        self.name = engine.name
        self.p_min = p_min
        self.runner = LlamaRunner(engine._llama)

    def draft(self, seq: Sequence[int], k: int, max_token: int) -> list[int]:
        """Up to ``k`` greedy draft tokens continuing ``seq``; fewer when the draft gets unsure.

        ``max_token`` is the main model's vocabulary size: a draft token beyond it ends the draft.
        """
        runner = self.runner
        runner.sync(seq)
        out: list[int] = []
        for i in range(k):
            token, prob = runner.top(-1)
            if prob < self.p_min or token >= max_token:
                break
            out.append(token)
            if i + 1 < k:  # the last draft token's successor is never needed
                runner.feed([token])
        return out

    def reset(self) -> None:
        self.runner.reset()

    def close(self) -> None:
        self.engine.close()

