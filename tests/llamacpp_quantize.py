"""tools/llama_quantize.py (llama.cpp's own quantiser) as an importable test helper."""

from __future__ import annotations

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "llama_quantize", pathlib.Path(__file__).resolve().parent.parent / "tools" / "llama_quantize.py"
)
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)

FILE_TYPES = _tool.FILE_TYPES
quantize = _tool.quantize
