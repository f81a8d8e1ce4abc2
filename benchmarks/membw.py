"""The machine's memory read bandwidth (sum over a 1 GiB buffer, best of several, 2 threads) and the
batch-1 decode "speed of light": bandwidth ÷ bytes of weights read per token. Bytes per token are
the GGUF file's tensor bytes (what llama.cpp reads) and shoal's packed weights as loaded."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import THREADS, emit  # noqa: E402


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 7) -> float:
    import torch

    torch.set_num_threads(THREADS)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def gguf_weight_bytes() -> int:
    from shoal.loader import default_model_path
    from shoal.loader.gguf_file import open_gguf

    return sum(int(t.n_bytes) for t in open_gguf(default_model_path()).tensors)


def shoal_decode_bytes() -> int:
    """Bytes the packed decode kernels read per token: int4 codes + bf16 scales/zeros, int8 LM head."""
    from shoal.layers.quant import Int4Weight, Int8Weight, from_gguf_blocks
    from shoal.loader import iter_gguf_raw, load_config, resolve_model

    src = resolve_model(None)
    total = 0
    for name, t in iter_gguf_raw(src, load_config(src)):
        if t.qtype in ("Q4_0", "Q4_1", "Q8_0") and len(t.shape) == 2:
            qw = from_gguf_blocks(t.qtype, t.data, t.shape)
            n, k = qw.out_features, qw.in_features
            if isinstance(qw, Int4Weight):
                total += n * k // 2 + n * (k // qw.group_size) * 2 * 2
            elif isinstance(qw, Int8Weight):
                total += n * k + n * 2
        else:
            total += int(t.data.nbytes)
    return total


def main() -> int:
    bw = read_bandwidth()
    gguf = gguf_weight_bytes()
    packed = shoal_decode_bytes()
    res = {"engine": "machine", "read_bandwidth_gb_s": bw / 1e9, "gguf_weight_bytes": gguf,
           "shoal_decode_bytes": packed, "speed_of_light_gguf_tok_s": bw / gguf,
           "speed_of_light_shoal_tok_s": bw / packed}
    emit(res)
    print(json.dumps(res, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
