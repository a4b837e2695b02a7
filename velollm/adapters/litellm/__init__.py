"""velollm as a litellm provider (``velollm/<model>``), registered automatically when litellm is imported."""
