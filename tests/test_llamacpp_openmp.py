"""llama.cpp's OpenMP threads wait passively unless the environment says otherwise (velollm.plugins.llamacpp.openmp)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import os, sys; import velollm.plugins.llamacpp, llama_cpp; "
         "print(os.environ.get('OMP_WAIT_POLICY'))")


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_wait_policy_is_passive_unless_set(given: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_the_policy_is_set_before_llama_cpp_loads() -> None:
    """libgomp reads OMP_WAIT_POLICY once, when llama.cpp's library loads: importing the plugin sets it first."""
    code = ("import sys, os; import velollm.plugins.llamacpp.openmp as m; "
            "print('llama_cpp' in sys.modules, os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "PASSIVE"]  # set while llama_cpp was not loaded yet
