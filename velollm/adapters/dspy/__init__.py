"""velollm for DSPy: ``LM`` (DSPy 3.4's engine route), ``Adapter`` (constrained JSON, parsing, retry),
stream listeners. Nothing here is specific to a backend: only the Engine protocol and the pool."""
