"""ModelRunner: builds the model on the platform's device, owns the paged KV cache, and turns a
`SchedulerOutput` into one forward pass + sampling.

Start-up: build the model (dtype from config/platform) → load weights with a progress bar →
post-process (e.g. MLA absorbed weights) → optional weight quantization → size the KV cache from
the memory budget and bind it to every attention layer.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch._dynamo.utils import counters

from shoal.backends.base import Platform
from shoal.config import EngineConfig, ModelConfig
from shoal.forward_batch import AttentionMetadata, ForwardBatch
from shoal.layers.sampler import SamplerOutput, SamplingRow, sample
from shoal.loader import ModelSource, iter_gguf_raw, iter_weights
from shoal.models.registry import model_class

if TYPE_CHECKING:  # the scheduler's output is read, never built, here: the engine sits above
    from shoal.engine.scheduler import SchedulerOutput

log = logging.getLogger("shoal")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, platform: Platform) -> torch.dtype:
    if name == "auto":
        # bf16 where the platform says it is the fast dtype (the CPU: where shoal's SIMD kernels run,
        # which keep bf16 between kernels and compute in each ISA tier's own arithmetic)
        if getattr(platform, "has_fast_bf16", lambda: False)():
            return torch.bfloat16
        return platform.default_dtype()
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def kv_layers(model: nn.Module) -> list[nn.Module]:
    """Modules that own a slice of the paged cache (PagedAttention, MLA), in layer order."""
    return [m for m in model.modules() if hasattr(m, "kv_cache_spec") and hasattr(m, "bind_kv_cache")]


def _own_code(method: Any) -> Any:
    """A copy of a bound method with its own code object. Dynamo keeps one cache per code object;
    with module guards skipped, two runners in one process must not share compiled graphs."""
    f = method.__func__
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(g, method.__self__)


@dataclass(slots=True)
class StepResult:
    sampled: dict[str, int]  # request id → new token
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]]  # request id → (chosen logprob, top)
    errors: dict[str, RowError] = field(default_factory=dict)  # request id → why it cannot go on


@dataclass(slots=True, frozen=True)
class RowError:
    """Why one request's row produced no token; `client_error`: its own parameters caused it."""

    message: str
    client_error: bool = False


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, source: ModelSource, platform: Platform,
                 max_model_len: int, progress: bool = True) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.platform = platform
        self.device = platform.device()
        self.dtype = resolve_dtype(cfg.dtype, platform)
        self.block_size = cfg.cache.block_size or platform.kv_block_size
        self.max_model_len = max_model_len
        self.model = self._build_model(source, progress)
        self.num_blocks, self.kv_bytes_per_block = self._allocate_kv_cache()
        self.generators: dict[str, torch.Generator] = {}
        self._compiled_decode: dict[str, Any] | None = None
        self.warm_up(progress)

    # ------------------------------------------------------------------ start-up
    def _build_model(self, source: ModelSource, progress: bool) -> nn.Module:
        cls = model_class(self.model_cfg)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = cls(self.model_cfg)
        finally:
            torch.set_default_dtype(prev)
        if self._load_gguf_packed(source):
            from shoal.layers.quant import load_gguf_packed

            raw = iter_gguf_raw(source, self.model_cfg)
            weights = load_gguf_packed(model, raw, getattr(model, "stacked_params", []), self.cfg.quantization)
        else:
            weights = iter_weights(source, self.model_cfg)
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            weights = tqdm(weights, desc=f"loading {source.name}", unit=" tensors", leave=False)
        model.load_weights(weights)  # each parameter copy casts; fp32 scales stay exact until used
        if hasattr(model, "process_weights_after_loading"):
            model.process_weights_after_loading()
        if self.cfg.quantization != "none":
            from shoal.layers.quant import quantize_model

            quantize_model(model, self.cfg.quantization)
        return model.eval()

    def _load_gguf_packed(self, source: ModelSource) -> bool:
        """GGUF Q4_0/Q4_1/Q8_0 blocks go straight into packed weights when the compute dtype is a
        16-bit one (the packed kernels' fast path); float32 compute dequantizes them (exact)."""
        return (source.kind == "gguf" and self.dtype in (torch.bfloat16, torch.float16)
                and self.cfg.parallel.tensor_parallel_size == 1)

    def _allocate_kv_cache(self) -> tuple[int, int]:
        layers = kv_layers(self.model)
        elem = torch.tensor([], dtype=self.dtype).element_size()
        per_token = sum(math.prod(shape) for m in layers for shape in m.kv_cache_spec().values()) * elem
        per_block = per_token * self.block_size
        cc = self.cfg.cache
        if cc.num_blocks_override:
            num_blocks = cc.num_blocks_override
        else:
            if cc.kv_cache_memory is not None:
                budget = cc.kv_cache_memory
            else:
                free, _ = self.platform.memory_info()
                budget = self.platform.kv_cache_budget(free)
            # never more than every sequence at full length could use
            useful = self.cfg.scheduler.max_num_seqs * math.ceil(self.max_model_len / self.block_size) + 1
            num_blocks = max(1, min(budget // per_block, useful))
        # one block more than the block manager hands out: the padded rows of a bucketed decode
        # batch write their K/V there (`scratch_block`), never into a request's blocks
        self.scratch_block = num_blocks
        for m in layers:
            caches = {
                key: torch.zeros((num_blocks + 1, self.block_size, *shape), dtype=self.dtype, device=self.device)
                for key, shape in m.kv_cache_spec().items()
            }
            m.bind_kv_cache(caches)
        self.kv_bytes_per_token = per_token
        return num_blocks, per_block

    # ------------------------------------------------------------------ warm-up, compiled decode
    def _dummy_batch(self, num_seqs: int, tokens_each: int) -> ForwardBatch:
        """A batch over cache slot 0.. (blocks a later request overwrites before reading them)."""
        bs, dev = self.block_size, self.device
        t = num_seqs * tokens_each
        nblocks = max(2, -(-tokens_each // bs))
        meta = AttentionMetadata(
            slot_mapping=torch.arange(tokens_each, device=dev).repeat(num_seqs),
            query_start_loc=torch.arange(num_seqs + 1, device=dev) * tokens_each,
            seq_lens=torch.full((num_seqs,), tokens_each, dtype=torch.long, device=dev),
            block_tables=torch.arange(nblocks, device=dev).repeat(num_seqs, 1),
            query_lens_cpu=[tokens_each] * num_seqs, seq_lens_cpu=[tokens_each] * num_seqs, block_size=bs,
            max_query_len=tokens_each, max_seq_len=tokens_each,
        )
        return ForwardBatch(
            input_ids=torch.zeros(t, dtype=torch.long, device=dev),
            positions=torch.arange(tokens_each, device=dev).repeat(num_seqs),
            attn=meta,
            logits_indices=torch.arange(num_seqs, device=dev) * tokens_each + tokens_each - 1,
        )

    def _logits(self, fb: ForwardBatch) -> torch.Tensor:
        return self.model.compute_logits(self.model(fb).index_select(0, fb.logits_indices))

    @torch.inference_mode()
    def warm_up(self, progress: bool = True) -> None:
        """Run prefills and a decode step eagerly (platform ops pack or cache their weights on first
        use), then — unless `enforce_eager` — compile the decode step for each batch-size bucket.

        Decode buckets: batch 1 (static shapes, C++ wrapper: the least per-step overhead); 2..8
        (batch size symbolic: the CPU's packed quantized GEMV range); above that, batches padded to
        static sizes (`_padded_sizes`), whose dense matmuls inductor max-autotunes. The context length
        is symbolic in every bucket, so no graph is re-traced after warm-up. Start-up with the
        default model (2 cores) takes a few minutes: each graph is compiled anew, frozen graphs
        bypass inductor's on-disk cache; `SHOAL_COMPILE_BATCHED=0` compiles batch 1 only. Where the
        platform runs every decode step's layers as one call (`Platform.decode_fused`: the CPU with
        the default model), nothing is compiled: the graph around that call would only add its own
        overhead."""
        slots = self.num_blocks * self.block_size
        if slots < 64:
            return
        # prompt-sized prefills where the cache allows: a platform builds the weights' forms for prompt
        # rows on first use (the CPU with AMX: tiles for 65-1,536 rows, ~100 ms; oneDNN's prepacked
        # copies above, ~0.8 s and ~370 MB with the default model; without AMX, nothing: prompts use the
        # decode layout), so a user's first long prompt does not pay for them and memory after start-up
        # is what serving needs. The larger one is a full
        # prompt chunk (at most 2,048 rows, in 128-token prompts: start-up stays short for big models)
        self._logits(self._dummy_batch(1, 96 if slots >= 96 else 32))
        chunk = self.platform.warm_up_prompt_tokens(min(self.cfg.scheduler.max_num_batched_tokens, 2048))
        if chunk > 96 and slots >= 128:
            self._logits(self._dummy_batch(max(1, chunk // 128), 128))
        self._logits(self._dummy_batch(1, 1))
        if self.cfg.enforce_eager:
            return
        max_seqs = self.cfg.scheduler.max_num_seqs
        if os.environ.get("SHOAL_COMPILE_FUSED") != "1" and self.platform.decode_fused(self.model, max_seqs):
            # (SHOAL_COMPILE_FUSED=1 compiles it anyway: tests, and timing the two against each other)
            log.info("the decode step runs its layers as one fused call: not compiled (it would only add overhead)")
            return
        buckets = [b for b in (1, 2) if b <= max_seqs] + self._padded_sizes
        if os.environ.get("SHOAL_COMPILE_BATCHED") == "0":  # batch 1 only (quicker start-up)
            buckets = [1]
        try:
            import torch._inductor.config as inductor_config

            # round where eager rounds (bf16 intermediates), so compiled greedy decoding follows eager
            inductor_config.emulate_precision_casts = True
            # weights become graph constants, so dense bf16 matmuls get oneDNN's prepacked
            # (AMX-blocked) weights instead of a reorder on every call (a global setting: per-compile
            # options do not reach the freezing pass)
            inductor_config.freezing = os.environ.get("SHOAL_FREEZE", "1") == "1"
            skip_guards = os.environ.get("SHOAL_GUARDS") != "all"
            breaks = sum(counters["graph_break"].values())
            self._compile_buckets(buckets, skip_guards, progress)
            if skip_guards and sum(counters["graph_break"].values()) > breaks:
                # the step did not compile as one graph (e.g. an MoE layer's data-dependent expert
                # loop): each decoder layer's forward is then a frame of its own, shared by every
                # layer, and without module guards the frame compiled for layer 0 would run every
                # layer with layer 0's (frozen) weights. Compile again, keeping the guards, and
                # without max-autotune: its GEMM kernels gave wrong tokens on per-layer frames
                # (tiny DeepSeek-V3, float32; not understood yet, so not used there)
                log.info("the decode step has graph breaks: recompiling with module guards, without max-autotune")
                self._compile_buckets(buckets, False, progress, autotune=False)
        except Exception as exc:  # noqa: BLE001 — a model/backend the compiler cannot take runs eagerly
            log.warning("compiled decode unavailable (%s: %s); running eagerly", type(exc).__name__, exc)
            self._compiled_decode = None

    def _compile_buckets(self, buckets: list[int], skip_guards: bool, progress: bool, autotune: bool = True) -> None:
        # batch-1 decode kernels are tiny: one thread each beats an OpenMP fork/join per kernel
        # (the matmuls, extern calls, still use every thread); parameters never change after
        # warm-up, so their guards are skipped when the step is one graph (the lookup cost ~0.8 ms
        # a step)
        opts: dict[str, Any] = {}
        if skip_guards:
            opts["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        cpp_wrapper = not os.environ.get("SHOAL_PY_WRAPPER")
        single = opts | {"cpp.threads": 1, "cpp_wrapper": cpp_wrapper}
        # padded batches have static shapes, so inductor can generate its own AMX GEMM kernels
        # for their dense matmuls (max-autotune: it times them against oneDNN's, once per shape;
        # measured at batch 32 on the default model's layer shapes: 20.3 → 15.7 ms of matmuls).
        # The C++ wrapper saves the Python wrapper's ~3.5 ms a step of op calls: `ci` recipe,
        # two engines in one process, alternating: 642–665 → 704–713 out tok/s (default GGUF, AMX
        # matmul ops), 520–538 → 561–608 (bf16 checkpoint, autotuned dense matmuls)
        padded = opts | {"cpp_wrapper": cpp_wrapper}
        if autotune and os.environ.get("SHOAL_MAX_AUTOTUNE", "1") != "0":
            padded |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                       # no timing tables on the terminal
                       "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
        self._compiled_decode = {
            # dynamic=None: honour maybe_mark_dynamic (dynamic=False would specialise every size)
            "single": torch.compile(_own_code(self._logits), dynamic=None, options=single),
            "batched": torch.compile(_own_code(self._logits), dynamic=None, options=opts),
            # one graph per padded size, each only ever called with its own size
            **{f"padded{p}": torch.compile(_own_code(self._logits), dynamic=None, options=padded)
               for p in self._padded_sizes},
        }
        for i, b in enumerate(buckets):
            msg = f"compiling the decode step: batch {b} ({i + 1}/{len(buckets)})"
            log.info(msg)
            if progress and sys.stderr.isatty():
                print(f"shoal: {msg}…", file=sys.stderr, flush=True)
            self._run_compiled(self._dummy_batch(b, 1))

    @property
    def _padded_sizes(self) -> list[int]:
        """Decode batch sizes above the packed-GEMV range are padded up to one of these (32, 64, …
        and max_num_seqs): static shapes for the dense matmuls, a bounded number of graphs. The
        dense matmuls are memory-bound at these sizes, so padded rows cost little."""
        max_seqs = self.cfg.scheduler.max_num_seqs
        if max_seqs <= self.platform.decode_small_batch_max:
            return []
        sizes = [p for p in (32, 64, 128, 256) if p < max_seqs]  # each graph costs ~1-2 min to compile
        return sizes + [max_seqs]

    def _pad(self, fb: ForwardBatch, size: int) -> ForwardBatch:
        """A decode batch grown to `size` rows: the extra rows are one-token sequences over the
        scratch block (their K/V writes land there; their logits are dropped)."""
        n, m, dev = fb.num_tokens, fb.attn, self.device
        extra = size - n
        scratch = self.scratch_block
        table = torch.full((size, m.block_tables.shape[1]), scratch, dtype=torch.long, device=dev)
        table[:n] = m.block_tables
        meta = AttentionMetadata(
            slot_mapping=torch.cat([m.slot_mapping, torch.full((extra,), scratch * self.block_size, device=dev)]),
            query_start_loc=torch.arange(size + 1, device=dev),
            seq_lens=torch.cat([m.seq_lens, torch.ones(extra, dtype=torch.long, device=dev)]),
            block_tables=table, query_lens_cpu=[1] * size, seq_lens_cpu=m.seq_lens_cpu + [1] * extra,
            block_size=m.block_size, max_query_len=1, max_seq_len=m.max_seq_len,
        )
        return ForwardBatch(
            input_ids=torch.cat([fb.input_ids, torch.zeros(extra, dtype=torch.long, device=dev)]),
            positions=torch.cat([fb.positions, torch.zeros(extra, dtype=torch.long, device=dev)]),
            attn=meta, logits_indices=torch.arange(size, device=dev),
        )

    def _run_compiled(self, fb: ForwardBatch) -> torch.Tensor:
        mark = torch._dynamo.maybe_mark_dynamic
        mark(fb.attn.block_tables, 1)
        if fb.num_tokens == 1:
            return self._compiled_decode["single"](fb)  # type: ignore[index]
        n = fb.num_tokens
        if n > self.platform.decode_small_batch_max:
            size = next(p for p in self._padded_sizes if p >= n)
            fb = self._pad(fb, size)
            mark(fb.attn.block_tables, 1)
            return self._compiled_decode[f"padded{size}"](fb)[:n]  # type: ignore[index]
        for t in (fb.input_ids, fb.positions, fb.attn.slot_mapping, fb.attn.seq_lens, fb.attn.block_tables,
                  fb.logits_indices, fb.attn.query_start_loc):
            mark(t, 0)
        return self._compiled_decode["batched"](fb)  # type: ignore[index]

    # ------------------------------------------------------------------ one step
    def _prepare(self, out: SchedulerOutput) -> ForwardBatch:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qlens: list[int] = []
        slens: list[int] = []
        logits_idx: list[int] = []
        tables: list[list[int]] = []
        for s in out.scheduled:
            req, n = s.request, s.num_new_tokens
            start = req.num_computed_tokens
            toks = req.all_token_ids[start : start + n]
            ids.extend(toks)
            rng = range(start, start + n)
            pos.extend(rng)
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in rng)
            qlens.append(n)
            slens.append(start + n)
            tables.append(blocks)
            if s.samples:
                logits_idx.append(len(ids) - 1)
        width = max(2, max(len(t) for t in tables))  # ≥ 2: a width-1 table would be its own graph
        dev = self.device
        # one tensor from padded rows (a tensor per row cost ~5 us each: ~0.3 ms a 32-row step)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        qsl = [0]
        for n in qlens:
            qsl.append(qsl[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.long, device=dev),
            seq_lens=torch.tensor(slens, dtype=torch.long, device=dev),
            block_tables=table.to(dev),
            query_lens_cpu=qlens,
            seq_lens_cpu=slens,
            block_size=bs,
            max_query_len=max(qlens),
            max_seq_len=max(slens),
        )
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            attn=meta,
            logits_indices=torch.tensor(logits_idx, dtype=torch.long, device=dev),
        )

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        g = self.generators.get(request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed)
            self.generators[request_id] = g
        return g

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    @torch.inference_mode()
    def forward_logits(self, out: SchedulerOutput) -> tuple[list, torch.Tensor | None]:
        """Run the model on one scheduled batch; logits [S, V] for the requests that sample."""
        fb = self._prepare(out)
        sampling = [s.request for s in out.scheduled if s.samples]
        if (self._compiled_decode is not None and fb.attn.decode_only and len(sampling) == fb.num_tokens
                and (fb.num_tokens == 1 or os.environ.get("SHOAL_COMPILE_BATCHED") != "0")):
            return sampling, self._run_compiled(fb)
        hidden = self.model(fb)
        if not sampling:
            return sampling, None
        return sampling, self.model.compute_logits(hidden.index_select(0, fb.logits_indices))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, blocked_ids: dict[str, list[int]]) -> StepResult:
        if out.is_empty:
            return StepResult({}, {})
        sampling, logits = self.forward_logits(out)
        if logits is None:
            return StepResult({}, {})
        rows = [
            SamplingRow(
                params=r.sampling_params,
                prompt_ids=r.prompt_token_ids,
                output_ids=r.output_token_ids,
                generator=self._generator(r.request_id, r.sampling_params.seed),
                blocked_ids=blocked_ids.get(r.request_id, []),
            )
            for r in sampling
        ]
        step = StepResult({}, {})
        states = [(g, g.get_state()) for g in (row.generator for row in rows) if g is not None]
        try:
            _collect(step, sampling, range(len(rows)), sample(logits, rows))
        except Exception:  # noqa: BLE001 - find the rows that fail; the others must still get their tokens
            log.exception("sampling a batch of %d failed; sampling its rows one by one", len(rows))
            for g, st in states:  # the failed pass may have drawn from seeded rows' generators
                g.set_state(st)
            step = StepResult({}, {})
            for i, row in enumerate(rows):
                try:
                    _collect(step, sampling, [i], sample(logits[i:i + 1], [row]))
                except Exception as exc:  # noqa: BLE001 - this request ends, the others go on
                    step.errors[sampling[i].request_id] = RowError(f"sampling failed: {type(exc).__name__}: {exc}")
        return step


def _collect(step: StepResult, sampling: list, index: Any, res: SamplerOutput) -> None:
    """Sampler output for rows `index` of the batch (res row k is batch row index[k]) → step."""
    for k, i in enumerate(index):
        r = sampling[i]
        if k in res.failed:
            step.errors[r.request_id] = RowError(res.failed[k], client_error=True)
            continue
        step.sampled[r.request_id] = res.token_ids[k]
        if res.logprobs is not None and r.sampling_params.logprobs is not None:
            step.logprobs[r.request_id] = (res.logprobs[k], res.top_logprobs[k] if res.top_logprobs else [])
