"""Builds shoal's CPU kernels with the system compiler:
- one library per ISA tier (isa.py): kernels.c and qgemv.c compiled with that tier's flags only, so
  each runs on any CPU that has the tier's features (never `-march=native`);
- the entry library: dispatch.c (the kernels' symbols, forwarding to the tier loaded at run time),
  linked with ops.cpp (the torch operators) when a C++ compiler and torch's headers are present.

`make install` (the `make run` / `make test` path) runs `build.main()`, which
builds every tier this architecture can compile (all four on x86-64), so that start-up only loads.
kernels.py builds whatever is missing on first use, after one log line. Libraries are cached under
`$SHOAL_CACHE_DIR/kernels` (default `~/.cache/shoal/kernels`), keyed by the sources, the compiler,
the tier's flags and (for the entry library) torch's version; a cache copied to another machine is
safe, since the tier is chosen by the CPU's features when it loads.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from shoal.backends.cpu import isa

log = logging.getLogger("shoal")

DIR = Path(__file__).parent
TIER_SOURCES = ("kernels.c", "qgemv.c")
ENTRY_SOURCE = "dispatch.c"
OPS_SOURCE = "ops.cpp"  # the torch-operator registrations (C++ against torch's headers)
# fp-contract off: no fused multiply-adds where the kernels reproduce torch's per-op rounding
COMMON_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fPIC"]


def cache_dir() -> Path:
    return Path(os.environ.get("SHOAL_CACHE_DIR") or Path.home() / ".cache" / "shoal") / "kernels"


def _headers() -> list[Path]:
    return sorted(DIR.glob("*.h"))


def _version(tool: str) -> str | None:
    try:
        p = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def _run(cmd: list[str]) -> str | None:
    """Run a build command; None on success, else its error text."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None if p.returncode == 0 else (p.stderr or p.stdout)[-3000:]


def c_compiler() -> tuple[str, str] | None:
    """(command, its --version text) of the C compiler (CC, else cc/gcc/clang), or None."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    version = _version(cc) if cc else None
    return (cc, version) if cc and version is not None else None


def cxx_compiler() -> tuple[str, str] | None:
    if os.environ.get("SHOAL_CPU_TORCH_OPS", "1") == "0":
        return None
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    version = _version(cxx) if cxx else None
    return (cxx, version) if cxx and version is not None else None


def _key(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def _publish(tmp: str, out: Path) -> Path:
    os.replace(tmp, out)  # atomic: concurrent processes never load a half-written library
    return out


def tier_path(tier: str, cc: tuple[str, str]) -> Path:
    srcs = b"".join(p.read_bytes() for p in [*(DIR / f for f in TIER_SOURCES), *_headers()])
    flags = " ".join(isa.compile_flags(tier) + COMMON_FLAGS).encode()
    return cache_dir() / f"shoal_{tier}_{_key(srcs, cc[1].encode(), flags)}.so"


def build_tier(tier: str, cc: tuple[str, str]) -> Path | str:
    """The tier's library (built when it is not cached), or the compiler's error text."""
    out = tier_path(tier, cc)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("building shoal's %s CPU kernels (once; `make install` builds them ahead)", tier)
    flags = isa.compile_flags(tier) + COMMON_FLAGS
    with tempfile.TemporaryDirectory() as tmpdir:
        objects = []
        for f in TIER_SOURCES:
            obj = os.path.join(tmpdir, f + ".o")
            err = _run([cc[0], *flags, "-c", str(DIR / f), "-o", obj])
            if err is not None:
                return f"{f} ({tier}): {err}"
            objects.append(obj)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        # -Bsymbolic: the tier's own calls between its kernels stay inside it (the entry library
        # exports the same names)
        err = _run([cc[0], "-shared", "-fopenmp", "-Wl,-Bsymbolic", *objects, "-o", tmp, "-lm"])
        if err is not None:
            os.unlink(tmp)
            return f"linking the {tier} tier: {err}"
        return _publish(tmp, out)


def _torch_version() -> str:
    import torch

    return torch.__version__


def entry_path(cc: tuple[str, str], cxx: tuple[str, str] | None) -> tuple[Path, bool]:
    """Where the entry library is (or would be) cached: (path, with torch operators)."""
    srcs = b"".join((DIR / f).read_bytes() for f in (ENTRY_SOURCE, OPS_SOURCE, "kernels.h", "routing.h"))
    if cxx is not None:
        return cache_dir() / f"shoal_entry_{_key(srcs, cxx[1].encode(), _torch_version().encode())}_ops.so", True
    return cache_dir() / f"shoal_entry_{_key(srcs, cc[1].encode())}.so", False


def _cxx_command(cxx: str, objects: list[str], out: str) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{d}" for d in cpp_extension.include_paths()]
    libdirs = cpp_extension.library_paths()
    return [cxx, "-O2", "-std=c++17", "-fPIC", "-shared", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
            *includes, str(DIR / OPS_SOURCE), *objects, "-o", out,
            *[f"-L{d}" for d in libdirs], *[f"-Wl,-rpath,{d}" for d in libdirs], "-lc10", "-ltorch_cpu", "-ldl", "-lm"]


def build_entry(cc: tuple[str, str], cxx: tuple[str, str] | None) -> tuple[Path, bool] | str:
    """The entry library: with the torch operators when a C++ compiler is given and they build
    (else C only, which kernels.py calls through ctypes); the error text when even that fails."""
    out, has_ops = entry_path(cc, cxx)
    if out.exists():
        return out, has_ops
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("building shoal's CPU kernel entry library%s (once; `make install` builds it ahead)",
             " with torch operators" if has_ops else "")
    with tempfile.TemporaryDirectory() as tmpdir:
        obj = os.path.join(tmpdir, "dispatch.o")
        err = _run([cc[0], "-O2", "-fPIC", "-c", str(DIR / ENTRY_SOURCE), "-o", obj])
        if err is not None:
            return f"dispatch.c: {err}"
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        if has_ops:
            err = _run(_cxx_command(cxx[0], [obj], tmp))  # type: ignore[index]
            if err is None:
                return _publish(tmp, out), True
            log.warning("building shoal's torch operator bindings failed (the kernels are called through "
                        "Python instead)\n%s", err)
            out, _ = entry_path(cc, None)
        err = _run([cc[0], "-shared", obj, "-o", tmp, "-ldl"])
        if err is not None:
            os.unlink(tmp)
            return f"linking dispatch.c: {err}"
        return _publish(tmp, out), False


def build_all(tiers: tuple[str, ...] | None = None) -> tuple[dict[str, Path | str], tuple[Path, bool] | str | None]:
    """Every buildable tier (or those given) and the entry library, the tiers two at a time.
    Returns ({tier: library or error}, entry library or error; None without a C compiler)."""
    cc = c_compiler()
    if cc is None:
        return {t: "no C compiler (set CC)" for t in (tiers or isa.buildable())}, None
    tiers = tiers or isa.buildable()
    with ThreadPoolExecutor(max_workers=2) as pool:
        entry = pool.submit(build_entry, cc, cxx_compiler())
        built = dict(zip(tiers, pool.map(lambda t: build_tier(t, cc), tiers)))
        return built, entry.result()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shoal-build-kernels",
                                description="Build shoal's CPU kernels for every ISA tier (cached).")
    p.add_argument("--tiers", nargs="*", choices=isa.TIERS, help="tiers to build (default: every buildable one)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    built, entry = build_all(tuple(args.tiers) if args.tiers else None)
    ok = True
    for tier, res in built.items():
        ok = ok and isinstance(res, Path)
        print(f"  {tier:8s} {res if isinstance(res, Path) else 'FAILED: ' + res.splitlines()[0]}")
    if entry is None or isinstance(entry, str):
        ok = False
        print(f"  entry    FAILED: {entry or 'no C compiler'}")
    else:
        print(f"  entry    {entry[0]} ({'with' if entry[1] else 'without'} torch operators)")
    runs = [t for t in isa.cpu_tiers() if isinstance(built.get(t), Path)]
    print(f"shoal CPU kernels: built in {time.perf_counter() - t0:.1f} s; this CPU runs "
          f"{', '.join(isa.cpu_tiers())}; in use: {runs[-1] if runs else 'none (plain torch)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
