"""Chat prompts: the GGUF's own template renders as llama-cpp-python renders it; fallbacks are right."""

from __future__ import annotations

from pathlib import Path

import pytest

from velollm.chat_templates import BUILTIN_TEMPLATES, ChatTemplate, fallback_format
from velollm.errors import InvalidRequest
from velollm.gguf import info as gguf_info

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a colour."},
]


def test_qwen_template_matches_llama_cpp_pythons_renderer(qwen_path: Path) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    source = gguf_info.inspect(qwen_path).chat_template
    ours = ChatTemplate(source, bos_token="<|endoftext|>", eos_token="<|im_end|>").render(MESSAGES)
    theirs = Jinja2ChatFormatter(source, eos_token="<|im_end|>", bos_token="<|endoftext|>")(messages=MESSAGES).prompt
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") and ours.count("<|im_start|>") == 5


def test_default_system_prompt_of_qwen_template(qwen_path: Path) -> None:
    template = ChatTemplate(gguf_info.inspect(qwen_path).chat_template)
    assert "You are Qwen" in template.render([{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize(
    ("arch", "vocab", "expected"),
    [("gemma3", (), "gemma"), ("gemma", (), "gemma"), ("llama", ("<|start_header_id|>",), "llama-3"),
     ("llama", ("[INST]",), "llama-2"), ("qwen2", ("<|im_start|>",), "chatml"), ("phi3", (), "chatml")],
)
def test_fallback_by_family(arch: str, vocab: tuple[str, ...], expected: str) -> None:
    assert fallback_format(arch, vocab) == expected


def test_gemma_fallback_folds_system_into_first_user_turn() -> None:
    text = ChatTemplate(BUILTIN_TEMPLATES["gemma"], bos_token="<bos>").render(MESSAGES)
    assert text == ("<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n")


def test_explicit_chat_format_wins_and_unknown_is_refused() -> None:
    chosen = ChatTemplate.for_model(gguf_template="{{ 'gguf' }}", architecture="qwen2", chat_format="llama-3",
                                    bos_token="<s>", eos_token="</s>")
    assert chosen.name == "llama-3" and "<|start_header_id|>user" in chosen.render(MESSAGES)
    assert ChatTemplate.for_model(gguf_template="{{ 'x' }}", architecture="qwen2", chat_format=None,
                                  bos_token="", eos_token="").render([]) == "x"
    with pytest.raises(InvalidRequest, match="unknown chat_format 'vicuna'"):
        ChatTemplate.for_model(gguf_template=None, architecture="llama", chat_format="vicuna", bos_token="",
                               eos_token="")


def test_template_errors_become_invalid_request() -> None:
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok")
    assert strict.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidRequest, match="user first"):
        strict.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(InvalidRequest, match="does not compile"):
        ChatTemplate("{% for %}")


def test_templates_run_sandboxed() -> None:
    sneaky = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequest):
        sneaky.render([{"role": "user", "content": "x"}])
