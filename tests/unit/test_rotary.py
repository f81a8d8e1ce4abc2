"""Rotary tables are built once per parameter set and shared by every layer that uses it."""

from __future__ import annotations

import gc

import torch

from shoal.layers import rotary
from shoal.layers.rotary import RotaryEmbedding


def test_layers_with_the_same_parameters_share_one_table():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    a, b = RotaryEmbedding(16, 256, 10000.0), RotaryEmbedding(16, 256, 10000.0)
    assert a.cos is b.cos and a.sin is b.sin
    c, d = RotaryEmbedding(16, 256, 500000.0), RotaryEmbedding(16, 256, 10000.0, yarn)
    assert c.cos is not a.cos and d.cos is not a.cos
    # each still holds the table its own parameters give
    for m, base in ((a, 10000.0), (c, 500000.0)):
        inv = 1.0 / base ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
        torch.testing.assert_close(m.cos, torch.outer(torch.arange(256, dtype=torch.float32), inv).cos())
    # and the table goes when the last layer holding it does
    n = len(rotary._TABLES)
    del c, m
    gc.collect()
    assert len(rotary._TABLES) == n - 1


def test_a_steps_layers_gather_the_rows_once_and_each_step_its_own():
    """Eagerly, layers sharing a table reuse the rows gathered for the same positions tensor (q and
    k of every layer of a step); another positions tensor, even with other values in the same
    storage size, gets its own rows; a layer moved to other tables (its own buffers) never takes
    another table's rows. Every result equals the rotation computed from scratch."""
    a, b = RotaryEmbedding(8, 64, 10000.0), RotaryEmbedding(8, 64, 10000.0)
    x = torch.randn(5, 2, 8)

    def fresh(m: RotaryEmbedding, pos: torch.Tensor) -> torch.Tensor:
        from shoal.backends import native
        return native.rotary(x, m.cos.index_select(0, pos), m.sin.index_select(0, pos), False)

    with torch.inference_mode():
        p1 = torch.tensor([0, 1, 2, 3, 4])
        torch.testing.assert_close(a(p1, x), fresh(a, p1))
        first = a._tables.gathered
        torch.testing.assert_close(b(p1, x), fresh(b, p1))
        assert b._tables.gathered is first  # reused, not gathered again
        p2 = torch.tensor([9, 10, 11, 12, 13])
        torch.testing.assert_close(b(p2, x), fresh(b, p2))
        assert b._tables.gathered is not first and b._tables.gathered[0] is p2
        b.cos, b.sin = b.cos * 2, b.sin * 2  # its own buffers now
        torch.testing.assert_close(b(p2, x), fresh(b, p2))
        torch.testing.assert_close(a(p2, x), fresh(a, p2))
