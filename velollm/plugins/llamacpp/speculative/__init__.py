"""Speculative decoding that pays off or stays out of the way.

Drafters (prompt lookup, a small draft GGUF model) propose tokens; the main model verifies them in
one batch; a cost model measured on this machine decides, step by step, how many tokens to draft
(0 = plain decoding). See :mod:`velollm.plugins.llamacpp.speculative.costmodel` for the reasoning.
"""

from velollm.plugins.llamacpp.speculative.costmodel import AcceptanceModel, Choice, CostTable, ceiling, choose_gamma
from velollm.plugins.llamacpp.speculative.draft import DraftModel, VocabSummary, check_compatible
from velollm.plugins.llamacpp.speculative.lookup import PromptLookup
from velollm.plugins.llamacpp.speculative.setup import attach, plan, request_mode
from velollm.plugins.llamacpp.speculative.speculator import MODES, Mode, RunStats, Speculator

__all__ = [
    "MODES", "AcceptanceModel", "Choice", "CostTable", "DraftModel", "Mode", "PromptLookup", "RunStats",
    "Speculator", "VocabSummary", "attach", "ceiling", "check_compatible", "choose_gamma", "plan", "request_mode",
]
