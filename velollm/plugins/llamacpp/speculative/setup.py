"""From load options to a ready :class:`Speculator`: which drafters, which mode, the draft model's check."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from velollm.errors import InvalidRequest, UnsupportedFeature
from velollm.plugins.llamacpp.runner import ContextRunner
from velollm.plugins.llamacpp.speculative.draft import DraftModel, VocabSummary, check_compatible
from velollm.plugins.llamacpp.speculative.speculator import DEFAULT_MAX_GAMMA, MODES, Mode, Speculator

if TYPE_CHECKING:
    from velollm.engine import GenerationRequest, LoadOptions


def plan(options: LoadOptions) -> tuple[Mode, bool, str | None] | None:
    """(default mode, offer prompt lookup?, draft model reference), or None when nothing is configured.

    ``speculative="auto"`` or ``"lookup"`` offers prompt lookup (it needs no model); a draft model
    or ``prompt_lookup=True`` alone makes ``"auto"`` the default.
    """
    mode = options.speculative
    lookup = options.prompt_lookup or mode in ("auto", "lookup")
    draft = options.draft_model
    if mode == "draft" and not draft:
        raise InvalidRequest("speculative='draft' needs a draft_model")
    if mode is None:
        mode = "auto" if lookup or draft else "off"
    if mode == "off" and not lookup and not draft:
        return None
    return mode, lookup, draft


def attach(llama: Any, name: str, options: LoadOptions, load_draft: Callable[[str], Any],
           costs_on: ContextRunner | None = None) -> Speculator | None:
    """Build the speculator an engine's options ask for (None if they ask for none).

    ``load_draft(ref)`` loads the draft model as an engine of the same backend; it is refused with
    :class:`~velollm.errors.IncompatibleDraftModel` unless its vocabulary matches the main model's.
    ``costs_on``: the context sequence the batch-cost table is timed on (default: the ``Llama``'s own).
    """
    configured = plan(options)
    if configured is None:
        return None
    mode, lookup, ref = configured
    draft = None
    if ref:
        engine = load_draft(ref)
        try:
            check_compatible(VocabSummary.of(llama, name), VocabSummary.of(engine._llama, engine.name))
            draft = DraftModel(engine, p_min=options.draft_p_min)
        except BaseException:
            engine.close()
            raise
    try:
        return Speculator.build(llama, mode=mode, lookup=lookup, draft=draft,
                                max_gamma=options.n_draft or DEFAULT_MAX_GAMMA, n_draft=options.n_draft,
                                costs_on=costs_on)
    except BaseException:
        if draft is not None:
            draft.close()
        raise


def request_mode(speculator: Speculator | None, request: GenerationRequest) -> Mode:
    """The mode one request runs in: its ``extra["speculative"]`` if given, else the engine's default."""
    wanted = request.extra.get("speculative")
    if wanted is None:
        return speculator.mode if speculator is not None else "off"
    if wanted not in MODES:
        raise InvalidRequest(f"extra['speculative'] must be one of {', '.join(MODES)}, not {wanted!r}")
    if wanted in ("off", "auto") and speculator is None:
        return "off"
    if speculator is None:
        raise UnsupportedFeature(f"speculative={wanted!r}: this engine was loaded without speculative decoding "
                                 "(load it with speculative=..., prompt_lookup=True or draft_model=...)")
    if wanted == "draft" and speculator.draft is None:
        raise UnsupportedFeature("speculative='draft': this engine was loaded without a draft_model")
    return wanted  # type: ignore[return-value]
