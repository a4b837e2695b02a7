"""The synthetic GGUF generator (velollm.gguf.synthetic): its models load and generate on llama.cpp's
CPU build and on the native numpy engine, and the two agree teacher-forced with the near-tie rule.

These models stand in for real ones on the GPU machine (tests/test_gpu.py), where nothing large can
be copied; here they are checked against two independent implementations so a GPU-vs-CPU
comparison on them means something.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from parity_support import NEAR_TIE, compare, llama_greedy, llama_logits

from velollm.engine import GenerationRequest, LoadOptions
from velollm.gguf import info as gguf_info
from velollm.gguf import synthetic

PROMPTS = ["The quick brown fox jumps over the lazy dog. Once upon a time",
           "def quicksort(arr):\n    if len(arr) <= 1:",
           "Question: What is the capital of France? Answer: 42 héllo ✓"]
N_NEW = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {name: synthetic.generate(root / f"{name}.gguf", arch=arch, size="tiny", qtype=qtype, seed=7)
            for name, arch, qtype in (("llama-q8_0", "llama", "q8_0"), ("qwen2-q8_0", "qwen2", "q8_0"),
                                      ("qwen2-f16", "qwen2", "f16"))}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_arguments_same_file_other_seed_other_weights(tmp_path: Path) -> None:
    a = synthetic.generate(tmp_path / "a.gguf", arch="llama", size="tiny", seed=3)
    b = synthetic.generate(tmp_path / "b.gguf", arch="llama", size="tiny", seed=3)
    c = synthetic.generate(tmp_path / "c.gguf", arch="llama", size="tiny", seed=4)
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)


@pytest.mark.parametrize(("arch", "qtype", "file_type"), [("llama", "q8_0", "Q8_0"), ("qwen2", "f16", "F16"),
                                                          ("qwen2", "f32", "F32")])
def test_metadata_is_what_llama_cpp_expects(tmp_path: Path, arch: str, qtype: str, file_type: str) -> None:
    path = synthetic.generate(tmp_path / "m.gguf", arch=arch, size="tiny", qtype=qtype, n_layer=2)
    info = gguf_info.inspect(path)
    shape = synthetic.SIZES["tiny"]
    assert (info.architecture, info.block_count, info.embedding_length) == (arch, 2, shape.n_embd)
    assert info.vocab_size == 256 + shape.n_merges + len(synthetic.SPECIALS)
    assert file_type in info.file_type
    assert info.chat_template == synthetic.CHAT_TEMPLATE
    tied = not any(t.name == "output.weight" for t in info.tensors)
    assert tied == (arch == "qwen2")


def test_cli_writes_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    assert synthetic.main([str(out), "--arch", "qwen2", "--size", "tiny", "--layers", "1"]) == 0
    assert gguf_info.inspect(out).block_count == 1
    assert "cli.gguf" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        synthetic.main([str(out), "--arch", "gpt-neox"])


def test_vocabulary_is_fixed_and_merges_are_consistent() -> None:
    tokens, merges = synthetic.train_bpe(synthetic.CORPUS, 252)
    assert (tokens, merges) == synthetic.train_bpe(synthetic.CORPUS, 252)
    assert len(tokens) == 256 + 252 and len(set(tokens)) == len(tokens)
    known = set(tokens)
    for rank, merge in enumerate(merges):
        a, b = merge.split(" ")
        assert a in known and b in known and tokens[256 + rank] == a + b


@pytest.mark.parametrize("name", ["llama-q8_0", "qwen2-q8_0", "qwen2-f16"])
def test_llamacpp_and_native_agree_teacher_forced(models: dict[str, Path], name: str) -> None:
    from velollm.plugins.llamacpp import LlamaCppBackend
    from velollm.plugins.native import NativeBackend

    path = models[name]
    options = LoadOptions(n_ctx=256, n_threads=1)
    llama = LlamaCppBackend("cpu").load(path, options)
    native = NativeBackend().load(path, options)
    try:
        # both generate through the Engine protocol; the zeroed special rows keep them going to max_tokens
        for engine in (llama, native):
            done = engine.generate(GenerationRequest(prompt=PROMPTS[0], max_tokens=8, temperature=0))
            assert done.usage.completion_tokens == 8 and done.finish_reason == "length" and done.text
        report = None
        for prompt in PROMPTS:
            ids = llama.tokenize(prompt)
            assert native.tokenize(prompt) == ids, "the two tokenizers split the synthetic vocabulary differently"
            seq = ids + llama_greedy(llama._llama, ids, N_NEW)  # llama.cpp's continuation, fed to both
            part = compare(llama_logits(llama._llama, seq), native.logits(seq, all_positions=True))
            report = part if report is None else report.merge(part)
        assert report is not None
        print(f"\n[{name}] {report.summary()}")
        assert not report.failures, report.summary()
        # the check has teeth: most positions are decisive, and the logits are close, not just the argmaxes
        assert report.decisive >= report.positions // 2, report.summary()
        assert report.min_cosine > 0.995, report.summary()
    finally:
        llama.close()
        native.close()


def test_near_tie_rule_fails_a_decisive_disagreement() -> None:
    ref = np.array([[0.0, 1.0, 0.9], [0.0, 3.0, 1.0]], np.float32)  # gaps 0.1 (near-tie) and 2.0 (decisive)
    flipped = np.array([[0.0, 0.9, 1.0], [0.0, 3.0, 1.0]], np.float32)
    assert not compare(ref, flipped).failures and len(compare(ref, flipped).tolerated) == 1
    wrong = np.array([[0.0, 1.0, 0.9], [0.0, 1.0, 3.0]], np.float32)
    report = compare(ref, wrong)
    assert report.failures == [(1, 1, 2, pytest.approx(2.0))] and report.decisive == 1 and NEAR_TIE == 0.25
