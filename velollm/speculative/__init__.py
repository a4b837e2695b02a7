"""Speculative decoding that pays off or stays out of the way.

Drafters (prompt lookup, a small draft GGUF model) propose tokens; the main model verifies them in
one batch; a cost model measured on this machine decides, step by step, how many tokens to draft
(0 = plain decoding). See :mod:`velollm.speculative.costmodel` for the reasoning.
"""

from velollm.speculative.costmodel import AcceptanceModel, Choice, CostTable, ceiling, choose_gamma
from velollm.speculative.draft import DraftModel, VocabSummary, check_compatible
from velollm.speculative.lookup import PromptLookup
from velollm.speculative.setup import attach, plan, request_mode
from velollm.speculative.speculator import MODES, Mode, RunStats, Speculator

__all__ = [
    "MODES", "AcceptanceModel", "Choice", "CostTable", "DraftModel", "Mode", "PromptLookup", "RunStats",
    "Speculator", "VocabSummary", "attach", "ceiling", "check_compatible", "choose_gamma", "plan", "request_mode",
]
