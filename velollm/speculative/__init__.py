"""Moved to :mod:`velollm.plugins.llamacpp.speculative` (it drives llama.cpp); kept for one release."""

from velollm._moved import module_shim

__getattr__ = module_shim("velollm.speculative", "velollm.plugins.llamacpp.speculative")
