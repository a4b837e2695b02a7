"""Native tokenizer parity with llama.cpp on a corpus of > 200 strings, for all three test models.

The expected ids are llama.cpp's own, computed here, so nothing is hard-coded. The corpus mixes
ASCII prose, code, whitespace runs, emoji (with ZWJ sequences and modifiers), CJK, accented and
other scripts, unusual Unicode whitespace, and every model's special tokens (whole, partial, glued
to text), each tokenized with and without special-token parsing and BOS.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from velollm.engine import Engine, LoadOptions
from velollm.plugins.native import NativeBackend

pytestmark = pytest.mark.slow

ASCII = [
    "Hello world", "Hello, world!", "The quick brown fox jumps over the lazy dog.", "a", "A", "I", "x y z",
    "It's a test; isn't it?", "I'm you're they'll we'd he's IT'S We'Ve", "don't DON'T Don't",
    "'s 't 're 've 'm 'll 'd",
    "Mr. Smith went to Washington D.C. in 1999.", "e-mail: someone@example.com, web: https://example.org/path?q=1&r=2",
    "ALL CAPS SENTENCE", "camelCaseIdentifier snake_case_identifier kebab-case-identifier",
    "3.14159 2.71828 1,000,000 1e-10 0x1F 0b1010", "12345678901234567890", "$100 €200 £300 ¥400 50% #1 @user",
    "((nested)) [brackets] {braces} <angles>", "!!!???...,,,;;;:::", "...", "--", "a--b", "end.", "Q&A",
    "The year 2024 had 366 days.", "version 1.2.3-beta+build.7", "C:\\Users\\name\\file.txt", "/usr/local/bin/python3",
    "foo=bar&baz=qux", "1+1=2, 2*3=6, 10/2=5, 7-3=4",
]
CODE = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "import numpy as np\nimport pandas as pd\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "const f = (x) => x ** 2;\nconsole.log(f(3));", '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "<html><body><div class=\"main\">Hi</div></body></html>",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;",
    "#!/bin/bash\necho \"$HOME\" && ls -la | grep '\\.py$'", "x = [i**2 for i in range(10) if i % 2 == 0]",
    "class Stack:\n    def __init__(self):\n        self.items = []\n", "fn main() {\n    println!(\"Hello\");\n}",
    "#include <stdio.h>\nint main(void) { return 0; }", "  indented = True\n\tTabbed = False\n",
    "if (a && b || !c) { return -1; }", "print(f\"{name!r:>10}\")", "@decorator\ndef f(*args, **kwargs): ...",
    "# comment\n// comment\n/* block */\n-- sql comment", "lambda x: x if x else None", "a_b__c___d____e",
    "0123456789", "key:\n  - item1\n  - item2\n", "try:\n    pass\nexcept Exception as exc:\n    raise\n",
    "matrix[i][j] += other[j][k] * 2", "\"\"\"Docstring.\"\"\"", "r'\\d+\\s*' + \"\\n\"", "x<<=2; y>>=1; z^=~w",
    "```python\nprint('hi')\n```", "diff --git a/x b/x\n@@ -1,2 +1,2 @@\n-old\n+new\n", "$ pip install -e '.[test]'",
    "<?xml version=\"1.0\"?><root attr='1'/>",
]
WHITESPACE = [
    " ", "  ", "   ", "    ", "        ", "\t", "\t\t", "\t\t\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", " \n ",
    "  \n  \n", "\n \n \n", " leading", "  leading two", "trailing ", "trailing  two  ", "a  b   c    d", "a\tb\t\tc",
    "a\nb\n\nc\n\n\nd", "line1\r\nline2\r\n", " \t \t ", "\n\t\n\t", "word \n", "   \n\n   x", "x\n\n\n\n\n\ny",
    "\t\n \r\n\t ", "    return x\n\n\n    ", "end\n",
]
EMOJI = [
    "😀", "😀😃😄", "I ❤️ Python", "👍🏽 thumbs up with skin tone", "👨‍👩‍👧‍👦 family", "🇫🇷🇩🇪🇯🇵 flags", "🧑‍💻 coding",
    "✨🚀🔥💯", "emoji at end 🎉", "🎉 emoji at start", "mixed😀text😃here", "☺ ☹ ✌ ✔ ✘ ★ ☆", "🏳️‍🌈", "👩🏻‍🔬",
    "🙂🙃", "1️⃣ 2️⃣ #️⃣", "🐍 + 🦀 = ❤", "🀄🃏", "emoji🤖", "❄️❄❄️",
]
CJK = [
    "你好，世界！", "中文分词测试", "我喜欢编程。", "日本語のテキスト", "こんにちは、世界", "カタカナとひらがな",
    "한국어 텍스트", "안녕하세요 세계", "漢字かなカナ混じり文", "中文English混合text", "東京タワー は 高い",
    "北京是中国的首都。上海是最大的城市。", "（全角括弧）「引用」『二重』", "１２３４５６７８９０", "ＡＢＣ全角英字",
    "数学：一加一等于二", "def 函数(参数):\n    返回 = 参数", "中 文 空 格", "。，、；：？！",
    "𠮷野家 (surrogate-range han)",
]
ACCENTED = [
    "héllo wörld café", "naïve résumé façade", "Ärger Öl Übel ß straße", "mañana año niño", "Ça va? Très bien!",
    "ÀÉÎÕÜ àéîõü", "Żółć gęślą jaźń", "Dvořák Škoda Čech", "Tiếng Việt có dấu", "Ελληνικά κείμενα", "Русский текст",
    "Українська мова", "עברית טקסט", "العربية نص", "हिन्दी पाठ", "ภาษาไทย", "ქართული", "Հայերեն", "ᚠᚢᚦᚨᚱᚲ",
    "e\u0301 combining acute", "a\u0308o\u0308u\u0308 combining diaeresis", "Å vs A\u030a", "ﬁ ﬂ ligatures",
    "Ⅻ roman numeral", "½ ¼ ¾ fractions", "x² y³ z⁴", "H₂O CO₂", "°C µm Ω Å", "™ © ®", "¿Qué? ¡Sí!",
]
UNUSUAL = [
    "\u00a0non-breaking\u00a0space", "thin\u2009space", "em\u2003space", "ideographic\u3000space", "zero\u200bwidth",
    "zwj\u200djoiner", "soft\u00adhyphen", "line\u2028separator", "\ufeffBOM at start", "replacement \ufffd char",
    "tab\u000bvertical", "form\u000cfeed", "bell\u0007char", "null\u0000byte", "\u0085next line", "RTL \u202eoverride",
    "a" * 100, "ab" * 40, " " * 33, "\n" * 17, "la" * 25 + " " + "!" * 9, "𝕄𝕒𝕥𝕙 𝒷𝑜𝓁𝒹", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
]
GEMMA_SPECIAL = [
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n", "<bos>text", "text<eos>", "<pad><mask>",
    "<unused0> <unused42>", "[multimodal]", "<start_of_image>", "<start_of_turn", "start_of_turn>", "<<start_of_turn>>",
    "x<end_of_turn>y", "<bos><bos>", "<end_of_turn>\n\n", "\n<start_of_turn>", "<unk>",
]
QWEN_SPECIAL = [
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "text<|im_end|>", "<|im_start", "im_start|>", "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "<tool_call>{\"name\": \"f\"}</tool_call>", "[PAD151665]", "<|repo_name|>x<|file_sep|>y", "<<|im_end|>>",
    "<|im_end|><|im_end|>", "<|box_start|>(1,2)<|box_end|>", "<|vision_start|>", "<|endoftext|>\n\n",
]
BASE = ASCII + CODE + WHITESPACE + EMOJI + CJK + ACCENTED + UNUSUAL
# joined pairs exercise boundaries between categories
PAIRS = [BASE[i] + BASE[(i * 7 + 3) % len(BASE)] for i in range(0, len(BASE), 5)]
CORPUS = BASE + PAIRS + GEMMA_SPECIAL + QWEN_SPECIAL
MODES = [(True, True), (False, False), (True, False)]


def test_corpus_is_large_and_varied() -> None:
    assert len(set(CORPUS)) >= 200
    for group in (ASCII, CODE, WHITESPACE, EMOJI, CJK, ACCENTED, GEMMA_SPECIAL, QWEN_SPECIAL):
        assert len(group) >= 10


@pytest.fixture(scope="module")
def native_gemma(gemma_path: Path) -> Engine:
    engine = NativeBackend().load(gemma_path, LoadOptions(n_ctx=256))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def native_qwen(qwen_path: Path) -> Engine:
    engine = NativeBackend().load(qwen_path, LoadOptions(n_ctx=256))
    yield engine
    engine.close()


class _VocabOnlyLlama:
    """llama.cpp's tokenizer for a model without loading its weights (the 1.5B model)."""

    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama

        self.llama = Llama(model_path=str(path), vocab_only=True, verbose=False)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special))


def _mismatches(native: Engine, reference: object) -> list[str]:
    bad = []
    for text in CORPUS:
        for add_special, parse_special in MODES:
            mine = native.tokenize(text, add_special=add_special, parse_special=parse_special)
            theirs = reference.tokenize(  # type: ignore[attr-defined]
                text, add_special=add_special, parse_special=parse_special)
            if mine != theirs:
                bad.append(f"{text!r} add_special={add_special} parse_special={parse_special}: {mine} != {theirs}")
    return bad


def test_gemma_tokenizer_matches_llama_cpp(native_gemma: Engine, gemma_engine: Engine) -> None:
    assert _mismatches(native_gemma, gemma_engine) == []


def test_qwen_tokenizer_matches_llama_cpp(native_qwen: Engine, qwen_engine: Engine) -> None:
    assert _mismatches(native_qwen, qwen_engine) == []


def test_qwen15_tokenizer_matches_llama_cpp(qwen15_path: Path) -> None:
    native = NativeBackend().load(qwen15_path, LoadOptions(n_ctx=256))
    try:
        assert _mismatches(native, _VocabOnlyLlama(qwen15_path)) == []
    finally:
        native.close()


@pytest.mark.parametrize("which", ["gemma", "qwen"])
def test_detokenize_and_special_tokens_match_llama_cpp(which: str, request: pytest.FixtureRequest) -> None:
    native: Engine = request.getfixturevalue(f"native_{which}")
    reference: Engine = request.getfixturevalue(f"{which}_engine")
    for text in CORPUS:
        ids = reference.tokenize(text, add_special=True, parse_special=True)
        assert native.detokenize(ids) == reference.detokenize(ids), text
    # end-of-generation set and special-token texts used by chat templates
    vocab_size = native.vocab.size  # type: ignore[attr-defined]
    eog_native = {t for t in range(vocab_size) if native.is_end_of_generation(t)}  # type: ignore[attr-defined]
    eog_llama = {t for t in range(vocab_size) if reference.is_end_of_generation(t)}  # type: ignore[attr-defined]
    assert eog_native == eog_llama and eog_native
    for token in sorted(eog_llama) + [native.vocab.bos_id or 0]:  # type: ignore[attr-defined]
        assert native.token_text(token) == reference.token_text(token)  # type: ignore[attr-defined]


def test_chat_prompts_match_llama_cpp(native_gemma: Engine, gemma_engine: Engine, native_qwen: Engine,
                                      qwen_engine: Engine) -> None:
    """Both local backends render the same template and add BOS by the same rule."""
    from velollm.engine import GenerationRequest

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 👋 <b>world</b>"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again?"}]
    for native, reference in ((native_gemma, gemma_engine), (native_qwen, qwen_engine)):
        for request in (GenerationRequest(messages=messages), GenerationRequest(prompt="Plain prompt")):
            assert native.prompt_tokens(request) == reference.prompt_tokens(request)  # type: ignore[attr-defined]
