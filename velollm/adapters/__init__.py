"""Integrations above the Engine protocol: ``dspy/`` (LM, Adapter) and ``litellm/`` (the provider).

The OpenAI wire format they share with the server lives in :mod:`velollm.openai_wire`."""
