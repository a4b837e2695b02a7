"""llama.cpp's OpenMP threads spin briefly, then sleep, unless the environment says otherwise
(velollm.plugins.llamacpp.openmp)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import os, sys; import velollm.plugins.llamacpp, llama_cpp; "
         "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _env(**given: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(given)
    return env


@pytest.mark.parametrize(("given", "expected"), [
    ({}, "ACTIVE 10000"),  # velollm's default: a short spin (kept with many threads), then sleep
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),  # the user's policy, and libgomp's spin for it
    ({"GOMP_SPINCOUNT": "5"}, "None 5"),  # the user's spin count alone: velollm adds nothing
])
def test_wait_policy_is_left_to_the_environment_when_it_names_one(given: dict[str, str], expected: str) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], env=_env(**given), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_the_policy_is_set_before_llama_cpp_loads() -> None:
    """libgomp reads the variables once, when llama.cpp's library loads: importing the plugin sets them first."""
    code = ("import sys, os; import velollm.plugins.llamacpp.openmp as m; "
            "print('llama_cpp' in sys.modules, os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])")
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "ACTIVE", "10000"]  # set while llama_cpp was not loaded yet
