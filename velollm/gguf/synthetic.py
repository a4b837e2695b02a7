"""Synthetic GGUF models: random but seeded weights in the llama or qwen2 architecture.

Why: the GPU check runs on a machine that takes at most 64 MiB of copied files and has no network,
so real models cannot travel; a generator can, and makes a model of any size there. The models
are real to llama.cpp and to the native engine (a byte-level BPE vocabulary trained on a built-in
text, ChatML specials, a chat template), so everything velollm does with a GGUF file works on them;
only the text they generate is noise.

Weights are drawn as Q8_0 blocks (int8 values and one float16 scale per 32), so the F32 and F16
variants of a seed hold the same numbers (F16 rounded). The output rows of special tokens are
zero, so greedy decoding never stops early on an end-of-turn token; the output scale gives the
logits a spread of several units, so most greedy choices are clear (top-2 gap > 0.25) and a
parity check that allows near-ties still has plenty to check.

    python -m velollm.gguf.synthetic OUT.gguf --arch llama|qwen2 --size tiny|small|large [--type q8_0|f16|f32]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARCHITECTURES = ("llama", "qwen2")
TYPES = ("q8_0", "f16", "f32")
SPECIALS = ("<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_QK = 32  # values per Q8_0 block
_INT8_STD = float(np.sqrt((127 * 128) / 3))  # std of integers uniform on [-127, 127]


@dataclass(frozen=True)
class Shape:
    """Hyper-parameters of one synthetic model."""

    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx: int = 4096
    n_merges: int = 252  # 256 bytes + merges + 4 specials = 512 tokens


#: tiny: unit tests (~4 MB at Q8_0); small: the default, copied along (~40 MB); large: generated on the GPU
#: machine (~390 MB), big enough that decoding is bound by memory bandwidth rather than kernel launches.
SIZES: dict[str, Shape] = {
    "tiny": Shape(n_embd=256, n_layer=4, n_ff=768, n_head=4, n_head_kv=2),
    "small": Shape(n_embd=768, n_layer=6, n_ff=2048, n_head=12, n_head_kv=4),
    "large": Shape(n_embd=2048, n_layer=8, n_ff=5632, n_head=16, n_head_kv=4),
}

# The text the vocabulary's merges are learned from: English and Python, so prompts tokenize into
# a mix of merged words and single bytes.
CORPUS = """
The quick brown fox jumps over the lazy dog. A model that is loaded once serves every request in turn.
The three primary colors are red, green and blue. In 1969, Neil Armstrong walked on the moon.
Once upon a time there was a small language model that wanted to run on every machine it met.
Question: What is the capital of France? Answer: The capital of France is Paris.
def quicksort(arr):
    if len(arr) <= 1:
        return arr
    pivot = arr[len(arr) // 2]
    left = [x for x in arr if x < pivot]
    middle = [x for x in arr if x == pivot]
    right = [x for x in arr if x > pivot]
    return quicksort(left) + middle + quicksort(right)
class Engine:
    def generate(self, request):
        return self.model.forward(request.tokens)
for i in range(10):
    print(i, "hello world", {"key": "value", "number": 42})
"""

_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def _byte_alphabet() -> list[str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def train_bpe(text: str, n_merges: int) -> tuple[list[str], list[str]]:
    """Byte-level BPE on ``text``: (tokens: 256 bytes then one per merge, merges "a b" in rank order).

    Ties between equally frequent pairs go to the lexicographically smallest, so the result is fixed.
    """
    alphabet = _byte_alphabet()
    words = Counter("".join(alphabet[b] for b in w.encode("utf-8")) for w in _WORDS.findall(text))
    split = {w: list(w) for w in words}
    tokens, merges = list(alphabet), []
    known = set(tokens)
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, parts in split.items():
            for a, b in zip(parts, parts[1:], strict=False):
                pairs[(a, b)] += words[word]
        candidates = [(-count, pair) for pair, count in pairs.items() if pair[0] + pair[1] not in known]
        if not candidates:
            break
        _, (a, b) = min(candidates)
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        known.add(a + b)
        for parts in split.values():
            i = 0
            while i < len(parts) - 1:
                if parts[i] == a and parts[i + 1] == b:
                    parts[i:i + 2] = [a + b]
                i += 1
    filler = 0
    while len(tokens) < 256 + n_merges:  # a corpus too small for n_merges: pad with unused tokens
        tokens.append(f"<|unused_{filler}|>")
        filler += 1
    return tokens, merges


class _Weights:
    """Draws Q8_0 blocks from one seeded generator and renders them in the requested type."""

    def __init__(self, seed: int, qtype: str) -> None:
        self.rng = np.random.default_rng(seed)
        self.qtype = qtype

    def matrix(self, rows: int, cols: int, std: float, zero_rows: tuple[int, ...] = ()) -> tuple[np.ndarray, object]:
        """(array, raw dtype for GGUFWriter) of a ``rows x cols`` matrix with entries of about ``std``."""
        from gguf import GGMLQuantizationType

        assert cols % _QK == 0, f"columns ({cols}) must be a multiple of {_QK}"
        qs = self.rng.integers(-127, 128, size=(rows, cols), dtype=np.int8)
        if zero_rows:
            qs[list(zero_rows)] = 0
        scale = np.float16(std / _INT8_STD)
        if self.qtype != "q8_0":
            values = qs.astype(np.float32) * np.float32(scale)
            return (values.astype(np.float16) if self.qtype == "f16" else values), None
        blocks = np.empty((rows, cols // _QK, 2 + _QK), dtype=np.uint8)
        blocks[:, :, :2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
        blocks[:, :, 2:] = qs.view(np.uint8).reshape(rows, cols // _QK, _QK)
        return blocks.reshape(rows, -1), GGMLQuantizationType.Q8_0

    def vector(self, n: int, mean: float, std: float) -> np.ndarray:
        return (mean + std * self.rng.standard_normal(n)).astype(np.float32)


def generate(path: str | Path, *, arch: str = "qwen2", size: str | Shape = "small", qtype: str = "q8_0",
             seed: int = 0, n_layer: int | None = None) -> Path:
    """Write a synthetic model to ``path`` and return it; the same arguments give the same file."""
    import gguf

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, not {arch!r}")
    if qtype not in TYPES:
        raise ValueError(f"type must be one of {', '.join(TYPES)}, not {qtype!r}")
    shape = SIZES[size] if isinstance(size, str) else size
    layers = n_layer or shape.n_layer
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, merges = train_bpe(CORPUS, shape.n_merges)
    tokens += list(SPECIALS)
    special_ids = tuple(range(len(tokens) - len(SPECIALS), len(tokens)))
    n_vocab = len(tokens)
    head_dim = shape.n_embd // shape.n_head
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "f32": gguf.LlamaFileType.ALL_F32}[qtype]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"velollm-synthetic-{arch}-{size if isinstance(size, str) else 'custom'}-{qtype}-seed{seed}")
    w.add_file_type(int(file_type))
    w.add_context_length(shape.n_ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(layers)
    w.add_feed_forward_length(shape.n_ff)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(1e-6 if arch == "qwen2" else 1e-5)
    w.add_rope_freq_base(1_000_000.0 if arch == "qwen2" else 10_000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL for i in range(n_vocab)])
    w.add_token_merges(merges)
    bos = SPECIALS.index("<|endoftext|>" if arch == "qwen2" else "<|begin_of_text|>")
    w.add_bos_token_id(special_ids[bos])
    w.add_eos_token_id(special_ids[SPECIALS.index("<|im_end|>")])
    w.add_add_bos_token(arch == "llama")
    w.add_chat_template(CHAT_TEMPLATE)

    weights = _Weights(seed, qtype)
    out_std = 4.0 / np.sqrt(shape.n_embd)  # logits of about 4 units' spread after the final norm

    def matrix(name: str, rows: int, cols: int, std: float, zero_rows: tuple[int, ...] = ()) -> None:
        data, raw = weights.matrix(rows, cols, std, zero_rows)
        w.add_tensor(name, data, raw_dtype=raw) if raw is not None else w.add_tensor(name, data)

    tied = arch == "qwen2"  # Qwen2.5's small models share the embedding with the output head
    matrix("token_embd.weight", n_vocab, shape.n_embd, out_std if tied else 1.0, special_ids if tied else ())
    w.add_tensor("output_norm.weight", weights.vector(shape.n_embd, 1.0, 0.05))
    if not tied:
        matrix("output.weight", n_vocab, shape.n_embd, out_std, special_ids)
    q_dim, kv_dim = shape.n_head * head_dim, shape.n_head_kv * head_dim
    for il in range(layers):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", weights.vector(shape.n_embd, 1.0, 0.05))
        matrix(p + "attn_q.weight", q_dim, shape.n_embd, 1.0 / np.sqrt(shape.n_embd))
        matrix(p + "attn_k.weight", kv_dim, shape.n_embd, 1.0 / np.sqrt(shape.n_embd))
        matrix(p + "attn_v.weight", kv_dim, shape.n_embd, 1.0 / np.sqrt(shape.n_embd))
        if arch == "qwen2":
            for name, dim in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                w.add_tensor(f"{p}{name}.bias", weights.vector(dim, 0.0, 0.1))
        matrix(p + "attn_output.weight", shape.n_embd, q_dim, 1.0 / np.sqrt(q_dim))
        w.add_tensor(p + "ffn_norm.weight", weights.vector(shape.n_embd, 1.0, 0.05))
        matrix(p + "ffn_gate.weight", shape.n_ff, shape.n_embd, 1.0 / np.sqrt(shape.n_embd))
        matrix(p + "ffn_up.weight", shape.n_ff, shape.n_embd, 1.0 / np.sqrt(shape.n_embd))
        matrix(p + "ffn_down.weight", shape.n_embd, shape.n_ff, 1.0 / np.sqrt(shape.n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m velollm.gguf.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="qwen2")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--type", dest="qtype", choices=TYPES, default="q8_0")
    parser.add_argument("--layers", type=int, default=None, help="override the size's layer count")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    out = generate(args.out, arch=args.arch, size=args.size, qtype=args.qtype, seed=args.seed, n_layer=args.layers)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB ({args.arch}, {args.size}, {args.qtype}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
