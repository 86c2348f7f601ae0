"""The lattice (grid) types IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S."""

from __future__ import annotations

DEQUANTIZE: dict = {}
QUANTIZE: dict = {}
