"""The backend contract kit: standard tests a backend plugin runs against its own backend.

As LangChain ships standard tests for its integrations, velollm ships the rules of
:mod:`velollm.engine`'s contract as code: subclass :class:`BackendContract` in your plugin's tests
(see docs/plugins.md), or run :func:`run_rules` on a :class:`Subject` outside pytest. Needs pytest.
"""

from velollm.testing.contract import DEFAULT_MODEL, BackendContract
from velollm.testing.rules import RULES, ContractViolation, RuleResult, RuleSkipped, Subject, run_rules

__all__ = ["DEFAULT_MODEL", "RULES", "BackendContract", "ContractViolation", "RuleResult", "RuleSkipped", "Subject",
           "run_rules"]
