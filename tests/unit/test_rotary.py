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
