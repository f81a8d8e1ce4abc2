"""shoal's own CPU kernels (kernels.c): compiled on first use with the system C compiler, cached on
disk, called through ctypes, and exposed as torch custom ops so a compiled decode step can call them
too. Everything here has a plain-torch twin; when no compiler is found (or `SHOAL_CPU_KERNELS=0`)
the twin runs instead, after one log line saying why.

Compiling takes about a second (`cc -O3 -march=native -fopenmp`); the library is cached under
`$SHOAL_CACHE_DIR` (default `~/.cache/shoal`) keyed by the source, the compiler and the CPU flags,
so a copied cache never runs on a CPU it was not built for.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("shoal")

_SRC = Path(__file__).with_name("kernels.c")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("SHOAL_CACHE_DIR") or Path.home() / ".cache" / "shoal") / "kernels"


def _cpu_flags_line() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _compile() -> ctypes.CDLL | None:
    if os.environ.get("SHOAL_CPU_KERNELS", "1") == "0":
        log.info("shoal CPU kernels disabled (SHOAL_CPU_KERNELS=0): plain-torch ops run instead")
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        log.warning("no C compiler found (set CC): shoal's CPU kernels are off, plain-torch ops run instead")
        return None
    src = _SRC.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("C compiler %s does not run (%s): shoal's CPU kernels are off", cc, exc)
        return None
    key = hashlib.sha256(src + version.encode() + _cpu_flags_line().encode()).hexdigest()[:16]
    out = cache_dir() / f"shoal_cpu_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        # fp-contract off: no fused multiply-adds where the kernels reproduce torch's per-op rounding
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-o", tmp, str(_SRC), "-lm"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            os.unlink(tmp)
            log.warning("compiling shoal's CPU kernels failed (%s): plain-torch ops run instead", exc)
            return None
        if p.returncode != 0:
            os.unlink(tmp)
            log.warning("compiling shoal's CPU kernels failed: plain-torch ops run instead\n%s", p.stderr[-2000:])
            return None
        os.replace(tmp, out)  # atomic: concurrent processes never load a half-written library
    lib = ctypes.CDLL(str(out))
    f = lib.paged_decode_attention
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 7 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.rms_norm.restype = None
    lib.rms_norm.argtypes = [vp, i64, vp, vp, i64, i32, ctypes.c_float, i32, i32, i32]
    lib.rotary.restype = None
    lib.rotary.argtypes = [vp, i64, i64, vp, vp, vp, i64, i32, i32, i32, i32, i32]
    lib.silu_and_mul.restype = None
    lib.silu_and_mul.argtypes = [vp, i64, vp, i64, i32, i32, i32]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be built here (compiled at most once)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _compile()
                _tried = True
    return _lib


def decode_attention_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float32)
            and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and q.shape[1] % k_cache.shape[2] == 0 and library() is not None)


@torch.library.custom_op("shoal::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence) against k_cache [NB, BS, Hkv, D] / v_cache
    [NB, BS, Hkv, Dv] through block_tables [B, W]; seq_lens [B] tokens each (≥ 1). → [B, Hq, Dv]."""
    lib = library()
    assert lib is not None, "shoal CPU kernels unavailable: check decode_attention_supported first"
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    b, hq, d = q.shape
    _, bs, hkv, dv = v_cache.shape
    out = torch.empty((b, hq, dv), dtype=q.dtype)
    rc = lib.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
        b, hq, hkv, d, dv, bs, tables.shape[1], scale, _flag(q), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("paged_decode_attention: scratch allocation failed")
    return out


@paged_decode_attention.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
      seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))


_FLOATS = (torch.bfloat16, torch.float32)


def _eager_cpu(x: torch.Tensor) -> bool:
    """An elementwise kernel applies: an eager step (compiled graphs use the torch forms, which
    inductor fuses), a non-empty bf16/fp32 CPU tensor, and the library built."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype in _FLOATS
            and x.numel() > 0 and library() is not None)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [N, last] with evenly spaced, contiguous rows (copies only when they are not)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


def _flag(x: torch.Tensor) -> int:
    return int(x.dtype == torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The C RMSNorm for an eager step (one pass instead of torch's five); None when it does not
    apply (see _eager_cpu) and the caller runs the torch form."""
    if not _eager_cpu(x) or weight.dtype not in _FLOATS:
        return None
    x2, w = _rows(x), weight.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    library().rms_norm(x2.data_ptr(), x2.stride(0), w.data_ptr(), out.data_ptr(), x2.shape[0], x2.shape[1], eps,
                       _flag(x), _flag(w), torch.get_num_threads())
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor | None:
    """The C rotary embedding for an eager step; None when it does not apply."""
    if (not _eager_cpu(x) or x.dim() != 3 or x.stride(-1) != 1 or x.shape[-1] % 2
            or cos.dtype != torch.float32 or sin.dtype != torch.float32):
        return None
    t, nh, r = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    if cos.shape != (t, r // 2) or sin.shape != (t, r // 2):
        return None
    out = torch.empty((t, nh, r), dtype=x.dtype)
    library().rotary(x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), t, nh, r,
                     int(interleaved), _flag(x), torch.get_num_threads())
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    """The C SwiGLU for an eager step; None when it does not apply, or for a few rows, where
    torch's two ops cost less than the call."""
    if not _eager_cpu(x) or x.shape[-1] % 2 or x.numel() <= 8 * x.shape[-1]:
        return None
    x2 = _rows(x)
    half = x2.shape[1] // 2
    out = torch.empty((*x.shape[:-1], half), dtype=x.dtype)
    library().silu_and_mul(x2.data_ptr(), x2.stride(0), out.data_ptr(), x2.shape[0], half, _flag(x),
                           torch.get_num_threads())
    return out
