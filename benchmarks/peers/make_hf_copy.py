"""Write a bf16 safetensors copy of the default model (dequantized from its GGUF by `transformers`)
to .bench-venvs/smollm2-bf16-hf, for the peers that need a Hugging Face directory (vLLM) and for
`transformers` itself. Idempotent."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".bench-venvs" / "smollm2-bf16-hf"


def main() -> int:
    if (OUT / "config.json").exists() and any(OUT.glob("*.safetensors")):
        print(f"{OUT} exists")
        return 0
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from shoal.loader import default_model_path

    d, f = os.path.split(default_model_path())
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    gguf_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16)
    # a GGUF-loaded model refuses save_pretrained ("quantized with gguf"): copy its (already
    # dequantized) weights into a plain model built from the same config
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT)
    tok.save_pretrained(OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
