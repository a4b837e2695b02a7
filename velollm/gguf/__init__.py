"""GGUF files: ``header`` reads the raw header with bounds checks, ``info`` summarises a model, ``tensors``
prints the tensor table. Backend-neutral: no llama.cpp here."""
