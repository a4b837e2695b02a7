"""Integrations that sit above the Engine protocol: DSPy and litellm."""
