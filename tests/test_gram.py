"""The block-triangular Gram accumulation gives exactly X^T X once mirrored, and multiplies only the upper blocks."""

import pytest
import torch

from llama_pruning.gram import BLOCKS, MIN_WIDTH, add_gram_, mirror_


@pytest.mark.parametrize("width", [7, MIN_WIDTH + 3])
def test_mirrored_gram_is_exactly_x_transpose_x(width):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(-4, 5, (rows, width), generator=gen).double() for rows in (5, 12, 1)]
    gram = torch.zeros(width, width, dtype=torch.float64)
    for x in batches:
        add_gram_(gram, x)
    x = torch.cat(batches)
    assert torch.equal(mirror_(gram), x.T @ x)  # integer data: exact in float64
    assert torch.equal(mirror_(gram), x.T @ x)  # mirroring twice changes nothing


def test_only_the_upper_block_triangle_is_accumulated():
    width = 4 * MIN_WIDTH
    gram = add_gram_(torch.zeros(width, width), torch.ones(3, width))
    block = width // BLOCKS
    upper = torch.ones(BLOCKS, BLOCKS).triu().repeat_interleave(block, 0).repeat_interleave(block, 1)
    assert torch.equal(gram, 3 * upper)
