"""Perplexity on a fixed text (data/ppl/gettysburg_address.txt), shoal next to llama.cpp on the same GGUF.

Rows: llama.cpp (llama-cpp-python, its own venv, run as a subprocess of this script) on the default
model's Q4_1 GGUF; shoal on that file with its default packed weights (int4 layers, int8 LM head,
bf16 compute; on CPUs without AMX the prompt's activations are rounded to int8 per group of 32 as
decode's are); the same with SHOAL_CPU_PROMPT_ACTIVATIONS=bf16 (a subprocess: bf16 prompt
activations); shoal with float32 compute (the GGUF dequantized exactly — the reference row).
Perplexity as in tests/engine/test_quant_quality.py: the ids are shoal's tokenizer encode(text)
(BOS included when the tokenizer adds one), one causal forward pass over the whole text,
exp(mean cross-entropy of logits[:-1] vs ids[1:]). llama.cpp is given exactly those ids (its own
tokenization of the text is compared and reported), and its logits go through the same formula in
float64 numpy. Writes benchmarks/results/ppl.json; prints a Markdown table and one RESULT line.
Run with shoal's venv: .venv/bin/python benchmarks/ppl.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import ROOT, THREADS, VENVS, emit  # noqa: E402

TEXT = ROOT / "data" / "ppl" / "gettysburg_address.txt"
LLAMACPP_PY = VENVS / "llamacpp" / "bin" / "python"
SHOAL_OPTS = dict(progress=False, kv_cache_memory=64 * 2**20, max_model_len=1024)


def llamacpp_child(gguf: str) -> int:
    """In the llama-cpp-python venv: read {"ids", "text"} on stdin, emit the perplexity of the ids."""
    import llama_cpp
    import numpy as np

    req = json.load(sys.stdin)
    ids: list[int] = req["ids"]
    n = len(ids)
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=THREADS,
                          n_threads_batch=THREADS, logits_all=True, verbose=False)
    own = llm.tokenize(req["text"].encode(), add_bos=True, special=False)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: n - 1], dtype=np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    nll = lse - logits[np.arange(n - 1), ids[1:]]
    emit({"ppl": math.exp(float(nll.mean())), "own_ids": own, "version": llama_cpp.__version__})
    return 0


def shoal_ppl(dtype: str, text: str) -> tuple[float, list[int], bool]:
    """(perplexity, token ids, whether a BOS was added) of `text` under shoal's default model in `dtype`."""
    import torch

    sys.path.insert(0, str(ROOT))
    from shoal import LLM
    from tests.engine.test_quant_quality import perplexity

    torch.set_num_threads(THREADS)
    llm = LLM(None, dtype=dtype, **SHOAL_OPTS)
    tok = llm.tokenizer
    ids = tok.encode(text)
    return perplexity(llm, text), ids, ids[:1] == [tok.bos_token_id] != tok.encode(text, add_special_tokens=False)[:1]


def run_llamacpp(gguf: str, ids: list[int], text: str) -> dict:
    if not LLAMACPP_PY.exists():
        return {"error": f"not set up ({LLAMACPP_PY} missing; see benchmarks/peers/setup_llamacpp.sh)"}
    p = subprocess.run([str(LLAMACPP_PY), str(Path(__file__).resolve()), "--llamacpp-child", gguf],
                       input=json.dumps({"ids": ids, "text": text}), capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"error": f"exit {p.returncode}: {(p.stderr or p.stdout)[-1500:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llamacpp-child", metavar="GGUF", help=argparse.SUPPRESS)
    ap.add_argument("--shoal-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.llamacpp_child:
        return llamacpp_child(a.llamacpp_child)
    if a.shoal_child:  # the bf16 row again, in this process's environment
        emit({"ppl": shoal_ppl("bfloat16", TEXT.read_text())[0]})
        return 0
    from shoal.loader import default_model_path

    gguf, text = default_model_path(), TEXT.read_text()
    bf16, ids, bos = shoal_ppl("bfloat16", text)
    f32, ids32, _ = shoal_ppl("float32", text)
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--shoal-child"], capture_output=True,
                           text=True, cwd=ROOT, timeout=600, env={**os.environ, "SHOAL_CPU_PROMPT_ACTIVATIONS": "bf16"})
    lines = [ln for ln in child.stdout.splitlines() if ln.startswith("RESULT ")]
    bf16_act = json.loads(lines[-1][len("RESULT "):])["ppl"] if child.returncode == 0 and lines else None
    assert ids == ids32
    lc = run_llamacpp(gguf, ids, text)
    same = lc.get("own_ids") == ids
    if "own_ids" in lc and not same:
        own = lc["own_ids"]
        at = next((i for i, (x, y) in enumerate(zip(ids, own)) if x != y), min(len(ids), len(own)))
        print(f"note: llama.cpp's own tokenization differs ({len(own)} ids vs {len(ids)}, first difference at "
              f"position {at}: {own[at:at + 3]} vs {ids[at:at + 3]}); it was given shoal's ids")
    rows = {
        f"llama.cpp (llama-cpp-python {lc.get('version', '?')}), Q4_1 GGUF": lc.get("ppl"),
        "shoal, GGUF blocks packed (int4 layers, int8 LM head), bf16": bf16,
        "shoal, the same, SHOAL_CPU_PROMPT_ACTIVATIONS=bf16": bf16_act,
        "shoal, GGUF dequantized, float32 (reference)": f32,
    }
    print(f"\nPerplexity on {TEXT.relative_to(ROOT)} ({len(ids)} tokens, BOS {'added' if bos else 'not added'}, "
          f"{len(ids) - 1} predicted; llama.cpp's own tokenization {'identical' if same else 'differs'}), "
          f"{gguf.rsplit('/', 1)[-1]}:\n")
    print("| engine / config | tokens | perplexity | vs shoal float32 |\n|---|---:|---:|---:|")
    for name, ppl in rows.items():
        cell = f"{ppl:.3f} | {ppl / f32:.3f}×" if ppl is not None else f"— | — ({lc.get('error', '')[:80]})"
        print(f"| {name} | {len(ids)} | {cell} |")
    result = {"text": str(TEXT.relative_to(ROOT)), "gguf": gguf, "tokens": len(ids), "bos_added": bos,
              "llamacpp_same_tokenization": same, "threads": THREADS,
              "perplexity": {"llama.cpp": lc.get("ppl"), "shoal_bf16_packed": bf16,
                             "shoal_bf16_packed_bf16_prompt_activations": bf16_act, "shoal_float32": f32},
              "llamacpp_error": lc.get("error"), "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ppl.json").write_text(json.dumps(result, indent=1))
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
