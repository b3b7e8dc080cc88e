"""One mechanism for every granularity: a 2-D tensor cut into (R x C) blocks that each get one scale.

Per tensor, per channel, per group and 2-D blocks are only different block extents (as in torchao's
``block_size``). Blocks at the right/bottom edge may be smaller (a row of 576 in groups of 128 ends with a
group of 64): the tensor is padded by repeating its edge values, which leaves each block's min and max
unchanged, and a mask marks the real elements so errors ignore the padding.
"""

from __future__ import annotations

import math

import torch


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """View a weight as 2-D (output channels x everything else): Linear as is, Conv flattened per filter."""
    if w.dim() == 2:
        return w
    if w.dim() == 1:
        return w.reshape(1, -1)
    return w.reshape(w.shape[0], -1)


def grid_shape(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """Number of blocks along each dimension (the shape of the scale tensor)."""
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def to_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (blocks, mask) of shape (n_block_rows, n_block_cols, R*C); mask is True on real elements."""
    rows, cols = w.shape
    br, bc = block
    nr, nc = grid_shape(rows, cols, block)
    pad_r, pad_c = nr * br - rows, nc * bc - cols
    padded = w
    if pad_r or pad_c:
        padded = torch.nn.functional.pad(w[None], (0, pad_c, 0, pad_r), mode="replicate")[0]
    mask = torch.zeros(nr * br, nc * bc, dtype=torch.bool, device=w.device)
    mask[:rows, :cols] = True
    return _fold(padded, block), _fold(mask, block)


def _fold(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    br, bc = block
    nr, nc = x.shape[0] // br, x.shape[1] // bc
    return x.reshape(nr, br, nc, bc).permute(0, 2, 1, 3).reshape(nr, nc, br * bc)


def expand(per_block: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Broadcast a (n_block_rows, n_block_cols) tensor back to every element of a ``shape`` tensor."""
    rows, cols = shape
    out = per_block.repeat_interleave(block[0], dim=0)[:rows]
    return out.repeat_interleave(block[1], dim=1)[:, :cols]
