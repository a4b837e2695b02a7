"""Chat prompts from messages: the model's own Jinja template, or a correct fallback.

Shared by every local backend so llama.cpp and the native engine build identical prompts.
A model without a template (Gemma 270M base) gets the format of its family, never llama-2's
``[INST]`` markup that llama-cpp-python falls back to.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from velollm.errors import InvalidRequest, UnsupportedFeature

if TYPE_CHECKING:
    from velollm.engine import GenerationRequest

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma has no system role: the system text opens the first user turn (as Google's template does).
GEMMA = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (ns.system if role == 'user' else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{% if role == 'user' %}{% set ns.system = '' %}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA2 = (
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' %}"
    "{% elif message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + ns.system + message['content'] | trim + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML, "gemma": GEMMA, "llama-3": LLAMA3, "llama-2": LLAMA2}

_FAMILY_FORMATS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}


def fallback_format(architecture: str, vocab_has: Sequence[str] = ()) -> str:
    """The built-in format for a model without a template, from its family and special tokens."""
    if architecture in _FAMILY_FORMATS:
        return _FAMILY_FORMATS[architecture]
    if "<|start_header_id|>" in vocab_has:
        return "llama-3"
    if "<|im_start|>" in vocab_has:
        return "chatml"
    if architecture == "llama" and "[INST]" in vocab_has:
        return "llama-2"
    return "chatml"


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """``tojson`` as Hugging Face renders chat templates: plain JSON. Jinja's own filter escapes
    ``<``, ``>``, ``&`` and ``'`` for HTML, so tool schemas would reach the model as ``\\u003c``."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


#: Fill-in-the-middle token texts (prefix, suffix, middle) of model families, in the order they are tried.
FIM_TOKENS: tuple[tuple[str, str, str], ...] = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, Granite, ...
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
)


def fim_tokens(tokenize: Callable[..., list[int]]) -> tuple[str, str, str] | None:
    """The model's FIM token texts, when its vocabulary has each of them as one special token."""
    for triple in FIM_TOKENS:
        if all(len(tokenize(t, add_special=False, parse_special=True)) == 1 for t in triple):
            return triple
    return None


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env.from_string(source)


class ChatTemplate:
    """A compiled template plus the token texts it needs."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "gguf") -> None:
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _compile(source)
        except TemplateError as exc:
            raise InvalidRequest(f"the model's chat template does not compile: {exc}") from None

    @classmethod
    def for_model(cls, *, gguf_template: str | None, architecture: str, chat_format: str | None,
                  bos_token: str, eos_token: str, vocab_has: Sequence[str] = ()) -> ChatTemplate:
        """Pick the template: an explicit ``chat_format`` wins, then the GGUF's, then the family fallback."""
        if chat_format and chat_format not in ("auto", "gguf"):
            if chat_format not in BUILTIN_TEMPLATES:
                known = ", ".join(["gguf", *BUILTIN_TEMPLATES])
                raise InvalidRequest(f"unknown chat_format {chat_format!r}; known: {known}")
            return cls(BUILTIN_TEMPLATES[chat_format], bos_token=bos_token, eos_token=eos_token, name=chat_format)
        if gguf_template:
            return cls(gguf_template, bos_token=bos_token, eos_token=eos_token, name="gguf")
        name = fallback_format(architecture, vocab_has)
        return cls(BUILTIN_TEMPLATES[name], bos_token=bos_token, eos_token=eos_token, name=name)

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except TemplateError as exc:
            raise InvalidRequest(f"chat template {self.name!r} rejected the messages: {exc}") from None

    def prompt_tokens(self, request: GenerationRequest, tokenize: Callable[..., list[int]]) -> list[int]:
        """The request's prompt as token ids, built the same way by every local backend.

        A template that writes BOS itself must not get a second one from the tokenizer. Tool
        definitions and tool turns go through :func:`velollm.tools.template_inputs`; a ``suffix``
        makes a fill-in-the-middle prompt from the model's FIM tokens.
        """
        if isinstance(request.prompt, list):  # token ids: used as they are (the engine checks the vocabulary)
            return list(request.prompt)
        if request.messages is not None:
            from velollm.tools import template_inputs

            messages, variables = template_inputs([m.model_dump() for m in request.messages], request.tools,
                                                  self.source)
            text = self.render(messages, **variables)
        elif request.suffix is not None:
            fim = fim_tokens(tokenize)
            if fim is None:
                raise UnsupportedFeature("this model has no fill-in-the-middle tokens (like Qwen2.5-Coder's "
                                         "<|fim_prefix|>); 'suffix' cannot be honoured")
            text = f"{fim[0]}{request.prompt or ''}{fim[1]}{request.suffix}{fim[2]}"
        else:
            text = request.prompt or ""
        add_special = not (request.messages is not None and self.bos_token and text.startswith(self.bos_token))
        tokens = tokenize(text, add_special=add_special, parse_special=True)
        if not tokens:
            raise InvalidRequest("the prompt is empty")
        return tokens
