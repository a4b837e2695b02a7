"""Built-in model sources: local paths, folders of GGUF files ($VELOLLM_MODELS_DIR), Hugging Face
references, and the packaged catalogue."""

from __future__ import annotations

from typing import Any

from velollm.hookspecs import hookimpl
from velollm.models import CatalogSource, FolderSource, HuggingFaceSource, PathSource


@hookimpl
def register_model_sources(register: Any) -> None:
    register(PathSource())
    register(FolderSource())
    register(HuggingFaceSource())
    register(CatalogSource())
