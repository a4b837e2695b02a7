"""A small retrieval-augmented generation pipeline that runs entirely on local GGUF models.

    python examples/rag.py                       # the built-in questions
    python examples/rag.py "When is the tool library open on Saturday?"

velollm embeds the Markdown files of ``examples/rag_docs/`` (``velollm.Embedder``: mean-pooled
hidden states of Qwen2.5-Coder-0.5B-Instruct, the best of the catalogue models as an embedder, see
``docs/embeddings.md``), DSPy's ``dspy.retrievers.Embeddings`` finds the passage nearest to the
question, and the same model answers from it through ``velollm.LM`` and ``velollm.Adapter``. The
pool loads the file twice (an embedding engine and a generating one); with mmap the weights share
memory. Nothing leaves the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dspy

import velollm

DOCS = Path(__file__).resolve().parent / "rag_docs"
EMBEDDER = "qwen2.5-coder-0.5b-instruct"
GENERATOR = "qwen2.5-coder-0.5b-instruct"
QUESTIONS = [
    "How long can I keep a borrowed drill?",
    "How far do runners go in a marathon?",
    "How do bees tell each other where flowers are?",
]


def load_documents(folder: Path = DOCS) -> list[str]:
    """One passage per Markdown file, sorted by name so indices are stable."""
    return [p.read_text(encoding="utf-8").strip() for p in sorted(folder.glob("*.md"))]


def build_retriever(corpus: list[str], *, embedder: str = EMBEDDER, k: int = 1, **options: object) -> dspy.Module:
    """DSPy's own brute-force retriever over the corpus, with a local embedder."""
    return dspy.retrievers.Embeddings(corpus=corpus, embedder=velollm.Embedder(embedder, **options), k=k)


class AnswerFromContext(dspy.Signature):
    """Answer the question using only the context. Be brief."""

    context: list[str] = dspy.InputField()
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class RAG(dspy.Module):
    def __init__(self, retriever: dspy.Module) -> None:
        super().__init__()
        self.retrieve = retriever
        self.respond = dspy.Predict(AnswerFromContext)

    def forward(self, question: str) -> dspy.Prediction:
        hits = self.retrieve(question)
        answer = self.respond(context=hits.passages, question=question).answer
        return dspy.Prediction(answer=answer, passages=hits.passages, indices=hits.indices)


def main(questions: list[str]) -> None:
    dspy.configure(lm=velollm.LM(GENERATOR, max_tokens=96), adapter=velollm.Adapter())
    rag = RAG(build_retriever(load_documents()))
    for question in questions:
        result = rag(question)
        source = result.passages[0].splitlines()[0].lstrip("# ")
        print(f"Q: {question}\n   retrieved: {source}\nA: {result.answer}\n")


if __name__ == "__main__":
    main(sys.argv[1:] or QUESTIONS)
