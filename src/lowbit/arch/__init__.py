"""Model families as data: where the blocks are, which producer/consumer pairs may exchange scales, norm
conventions, fused and transposed projections, and the GGUF architecture name.

Everything that depends on a model family reads ``lowbit.arch.families``; nothing else names a family.
A model whose family is not in the table still gets the methods that need no table (RTN, HQQ, GPTQ: any
``nn.Linear``); the parts that need an entry (AWQ, SmoothQuant, GGUF export) refuse in one line.
"""

from lowbit.arch.families import FAMILIES, Family, ScalePair, family_of, require_family

__all__ = ["FAMILIES", "Family", "ScalePair", "family_of", "require_family"]
