"""One constraint engine (llguidance) for every backend: JSON schemas, GBNF and Lark grammars.

``compile_constraint(json_schema=..., grammar=..., tokenizer=vocab) -> ConstraintFactory``;
``factory.start(max_tokens) -> ConstraintState`` per sequence (see :mod:`.state`). Budgets that
close an answer within ``max_tokens`` and the loop detector live here too, so every backend that
constrains gets them.
"""

from velollm.constraints.loops import LoopDetector, TokenClasses, find_loop
from velollm.constraints.state import ConstraintCache, ConstraintFactory, ConstraintState, compile_constraint
from velollm.constraints.vocab import ConstraintVocab, from_llama_vocab, from_pieces

__all__ = [
    "ConstraintCache", "ConstraintFactory", "ConstraintState", "ConstraintVocab", "LoopDetector", "TokenClasses",
    "compile_constraint", "find_loop", "from_llama_vocab", "from_pieces",
]
