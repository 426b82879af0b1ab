"""Builds kernels.c with gcc on first use and loads it with ctypes.

The shared library is cached under $ASYNCLLM_CACHE_DIR (default ~/.cache/asyncllm), keyed by the
sources, the compiler's version, its flags and this CPU's feature flags (`-march=native` code must
not run on another CPU). Building takes about a second; a missing or failing compiler leaves the
engine on its torch path (kernels="auto") or raises (kernels="cpu") with the compiler's message.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first, so the library's OpenMP resolves to it)

SOURCES = ("kernels.c", "kernels_impl.h", "quant_rows_impl.h", "decode_stack_impl.h", "panel_gemm_impl.h",
           "panel_gemm_bf16_impl.h", "prefill_attention_impl.h")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c11")
# gcc keeps to 256-bit vectors on AVX-512 CPUs unless told; the attention loops gain from 512.
X86_FLAGS = ("-mprefer-vector-width=512",)

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "rms_norm": (_P, _P, _P, _P, _P, _I64, _I64, _F32, _INT),
    "rotary": (_P, _I64, _I64, _P, _I64, _I64, _P, _P, _P, _I64, _I64, _INT),
    "silu_and_mul": (_P, _P, _I64, _I64, _INT),
    "linear_few_rows": (_P, _I64, _P, _P, _I64, _I64, _I64, _INT),
    "linear_quant_rows": (_P, _I64, _P, _I64, _P, _I64, _I64, _I64, _INT),
    "paged_decode_attention": (_P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _F32, _I64,
                               _INT),
    "decode_stack": (_P, _P, _I64, _P, _P, _P, _I64, _P, _P, _P, _INT),
    "lora_rows": (_P, _I64, _I64, _P, _I64, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _INT),
}
TYPED_SUFFIXES = ("f32", "bf16")


class KernelBuildError(RuntimeError):
    pass


def _cache_dir() -> Path:
    root = os.environ.get("ASYNCLLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "asyncllm")
    return Path(root) / "cpu_kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16 (oneDNN's bf16 kernels, torch's included, use them)."""
    return "amx_bf16" in _cpu_flags().split()


@functools.cache
def cpu_has_onednn_bf16() -> bool:
    """Whether oneDNN can pack and multiply bf16 weights here (torch's `_reorder_linear_weight`
    refuses bf16 without avx_ne_convert or avx512bw/vl/dq: AVX2-only CPUs)."""
    flags = set(_cpu_flags().split())
    return "avx_ne_convert" in flags or {"avx512bw", "avx512vl", "avx512dq"} <= flags or platform.machine() not in (
        "x86_64", "AMD64")


def _flags() -> tuple[str, ...]:
    return FLAGS + (X86_FLAGS if platform.machine() in ("x86_64", "AMD64") else ())


def _build(compiler: str) -> Path:
    here = Path(__file__).parent
    flags = _flags()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((here / name).read_bytes())
    for part in (version, " ".join(flags), platform.machine(), _cpu_flags()):
        digest.update(part.encode())
    target = _cache_dir() / f"asyncllm_cpu_kernels_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: concurrent processes never load a half-written file.
    fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-o", scratch, str(here / "kernels.c")],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelBuildError(f"{compiler} failed to build the CPU kernels:\n{done.stderr[-2000:]}")
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


@functools.cache
def load_library() -> ctypes.CDLL:
    """The compiled kernels (built once per process at most). Raises KernelBuildError when they
    cannot be built here."""
    if platform.system() != "Linux":
        raise KernelBuildError(f"the CPU kernels are built for Linux (this is {platform.system()})")
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise KernelBuildError("no C compiler found (gcc or $CC) to build the CPU kernels")
    lib = ctypes.CDLL(str(_build(compiler)))
    for name, argtypes in SIGNATURES.items():
        for suffix in TYPED_SUFFIXES:
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, None
    lib.write_kv_cache.argtypes = (_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _INT)
    lib.write_kv_cache.restype = None
    lib.quantize_blocks_f32.argtypes, lib.quantize_blocks_f32.restype = (_P, _I64, _I64, _I64, _I64, _P, _INT), _I64
    lib.panel_linear_blocks_f32.argtypes = (_P, _I64, _I64, _P, _I64, _P, _P, _I64, _I64, _INT)
    lib.panel_linear_blocks_f32.restype = _I64
    lib.panel_width.argtypes, lib.panel_width.restype = (), _I64
    lib.pack_panels_f32.argtypes, lib.pack_panels_f32.restype = (_P, _I64, _P, _I64, _I64, _INT), None
    lib.panel_linear_f32.argtypes = (_P, _I64, _I64, _P, _P, _P, _I64, _I64, _INT)
    lib.panel_linear_f32.restype = None
    lib.pack_panels_bf16.argtypes, lib.pack_panels_bf16.restype = (_P, _I64, _P, _I64, _I64, _INT), None
    lib.panel_linear_bf16.argtypes = (_P, _I64, _I64, _P, _P, _P, _I64, _I64, _INT)
    lib.panel_linear_bf16.restype = None
    lib.panel_linear_silu_f32.argtypes = (_P, _I64, _I64, _P, _P, _P, _I64, _I64, _INT)
    lib.panel_linear_silu_f32.restype = _I64
    lib.prefill_attention.argtypes = (_P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _F32, _I64,
                                      _P, _I64, _INT)
    lib.prefill_attention.restype = _I64
    for suffix in TYPED_SUFFIXES:
        fn = getattr(lib, f"decode_stack_scratch_{suffix}")
        fn.argtypes, fn.restype = (_P,), _I64
    return lib


def build_error() -> str | None:
    """Why the kernels cannot be used here, or None when they load."""
    try:
        load_library()
    except (KernelBuildError, OSError) as exc:
        return str(exc)
    return None
