"""The non-linear 4-bit types IQ4_NL and IQ4_XS: 4-bit indices into ggml's kvalues_iq4nl table."""

from __future__ import annotations

DEQUANTIZE: dict = {}
QUANTIZE: dict = {}
