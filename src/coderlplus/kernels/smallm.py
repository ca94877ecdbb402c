"""Native fp32 kernels for a decode step of a few rows: the CPU decoder's projections and layers.

Why: a decode step multiplies every weight of the model by a handful of rows (one per sampled
sequence). On a CPU with one thread, oneDNN and MKL reach only ~20-30 GFLOPS on such products,
and oneDNN's prepacked layout (``fast_decode._pack``) must be rebuilt from the weights before
every ``generate`` (~130 ms for 25M parameters on an AVX2 core: the weights change every step).
``smallm.c`` reads the ``nn.Linear`` weight as it is and streams it once per product, each
weight vector feeding up to 8 fused multiply-adds. Around the products, a token's layer is ~60
small tensor ops of a few microseconds each in torch; ``decode_layer`` runs the whole layer
(norms, projections, rotary, cache write, attention, MLP) in one call.

The C file is compiled on first use (:mod:`coderlplus.cbuild`: ``$CC``, else ``cc``) into
``$CODERLPLUS_KERNEL_CACHE`` (default ``~/.cache/coderlplus/kernels``), named by a hash of the
source and flags, and loaded with ``ctypes``. Where that is not possible — not x86-64, no
AVX2/FMA, no compiler, a failed build, or a first product that disagrees with ``F.linear`` —
``available()`` is False, ``unavailable_reason()`` says why, and callers use torch's kernels.
It is single-threaded: callers use it only when torch runs one thread (``usable``).
"""

from __future__ import annotations

import ctypes
import platform
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from coderlplus import cbuild

SOURCE = Path(__file__).with_name("smallm.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")
LIBS = ("-lm",)
MAX_ROWS = 16
"""Above this many rows a blocked GEMM is faster. Measured on an AVX2 core (2026-11-27), the
projections of a 25M-parameter Qwen2 (8 layers, width 512): 1 row 6.7 ms against 7.9 ms for
oneDNN prepacked, 4 rows 8.5 / 10.7, 8 rows 11.6 / 15.7, 16 rows 22.9 / 21.8, 32 rows 45 / 32.
A whole 32-token ``generate`` with native layers against the torch path: 25M model, 16 rows 904
/ 1135 ms, 32 rows 1903 / 1649; a 4-layer width-128 model, 16 rows 63 / 124, 64 rows 204 / 213,
256 rows 842 / 673."""

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None, "why": the reason it is None


def _cpu_reason() -> str | None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"not Linux x86-64 ({platform.system()} {platform.machine()})"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError as e:
        return f"cannot read /proc/cpuinfo: {e}"
    missing = [f for f in ("avx2", "fma") if f not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def _load() -> ctypes.CDLL | None:
    if "lib" in _state:  # settled: no lock on the decode path
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why = None, _cpu_reason()
        if why is None:
            try:
                lib = ctypes.CDLL(str(cbuild.build(SOURCE, FLAGS, LIBS)))
                lib.smallm_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 4
                lib.smallm_linear.restype = None
                lib.smallm_decode_layer.argtypes = (
                    [ctypes.c_long] * 8 + [ctypes.c_float] + [ctypes.c_void_p] * 19
                )
                lib.smallm_decode_layer.restype = ctypes.c_int
                why = _probe(lib)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                why = f"cannot build or load {SOURCE.name}: {e}"
            if why is not None:
                lib = None
        _state["lib"], _state["why"] = lib, why
        return lib


def _call(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    lib.smallm_linear(
        x.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), M, N, K, N
    )
    return y


def _probe(lib: ctypes.CDLL) -> str | None:
    """None when the library's products match ``F.linear`` on shapes that use every code path."""
    g = torch.Generator().manual_seed(0)
    for M, N, K in ((15, 7, 19), (8, 5, 64), (1, 3, 8)):  # row blocks 8+4+2+1, the K tail
        x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
        for bias in (b, None):
            if not torch.allclose(_call(lib, x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5):
                return f"its product disagrees with F.linear on {M}x{K} @ {N}x{K}"
    return None


def available() -> bool:
    """Whether the kernel is built, loaded and checked (tries once per process)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _state["why"]


def usable(w: torch.Tensor, b: torch.Tensor | None = None) -> bool:
    """Whether ``linear(x, w, b)`` can serve this weight now: a contiguous fp32 CPU matrix (and
    bias), torch on one thread, the kernel available."""
    return (
        w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.dim() == 2
        and w.is_contiguous()
        and (b is None or (b.dtype == torch.float32 and b.device.type == "cpu" and b.is_contiguous()))
        and torch.get_num_threads() == 1
        and available()
    )


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for a 2-D fp32 ``x`` (fastest up to ``MAX_ROWS`` rows) and a contiguous
    fp32 CPU weight; callers pick it with ``usable(w, b)`` once, not per call. No autograd: for
    no-grad passes (decoding)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"smallm kernel unavailable: {_state['why']}")
    if w.dim() != 2 or w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu":
        raise ValueError(
            f"smallm.linear: weight {tuple(w.shape)} {w.dtype} is not a contiguous fp32 CPU matrix"
        )
    if b is not None and (b.dtype != torch.float32 or not b.is_contiguous() or b.device.type != "cpu"):
        raise ValueError(f"smallm.linear: bias {b.dtype} is not a contiguous fp32 CPU vector")
    if x.dim() != 2 or x.dtype != torch.float32 or x.shape[1] != w.shape[1] or x.device.type != "cpu":
        raise ValueError(f"smallm.linear: x {tuple(x.shape)} {x.dtype} does not fit w {tuple(w.shape)}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"smallm.linear: bias {tuple(b.shape)} does not fit w {tuple(w.shape)}")
    return _call(lib, x.contiguous(), w, b)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def decode_layer(
    x: torch.Tensor,
    weights: DecodeLayerWeights,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    start: int,
    eps: float,
    scratch: torch.Tensor,
) -> None:
    """One Qwen2/Llama decoder layer for one new token per row, in place on ``x [B, hidden]``
    (see ``smallm_decode_layer`` in the C file): caches ``keys``/``values [B, KV, S, d]`` get the
    token's slot ``start``; ``mask [B, S]`` (bool) the key slots each row may attend to;
    ``cos``/``sin [B, d]`` the rows' rotary tables (sin negated on the first half);
    ``scratch``: ``scratch_size(...)`` floats. No autograd."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"smallm kernel unavailable: {_state['why']}")
    B, hidden = x.shape
    Bk, KV, S, d = keys.shape
    w = weights
    ok = (
        x.dtype == torch.float32
        and x.is_contiguous()
        and Bk == B
        and keys.is_contiguous()
        and values.is_contiguous()
        and values.shape == keys.shape
        and keys.dtype == values.dtype == torch.float32
        and mask.dtype == torch.bool
        and mask.shape == (B, S)
        and mask.is_contiguous()
        and cos.shape == sin.shape == (B, d)
        and cos.is_contiguous()
        and sin.is_contiguous()
        and w.heads * d == w.wq.shape[0]
        and KV * d == w.wk.shape[0]
        and w.wq.shape[1] == hidden
        and 0 <= start < S
        and d <= 1024
        and scratch.numel() >= scratch_size(B, hidden, w.heads, KV, d, w.wg.shape[0], S)
    )
    if not ok:
        raise ValueError("smallm.decode_layer: tensors of the wrong shape, dtype or layout")
    rc = lib.smallm_decode_layer(
        B, hidden, w.heads, KV, d, w.wg.shape[0], S, start, eps,
        x.data_ptr(), w.norm1.data_ptr(), w.wq.data_ptr(), w.wk.data_ptr(), w.wv.data_ptr(),
        _ptr(w.bq), _ptr(w.bk), _ptr(w.bv), w.wo.data_ptr(), w.norm2.data_ptr(),
        w.wg.data_ptr(), w.wu.data_ptr(), w.wd.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        keys.data_ptr(), values.data_ptr(), mask.data_ptr(), scratch.data_ptr(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"smallm_decode_layer returned {rc}")


def scratch_size(B: int, hidden: int, heads: int, kv_heads: int, d: int, inter: int, S: int) -> int:
    """Floats of scratch ``decode_layer`` needs."""
    return B * (hidden + (heads + 2 * kv_heads) * d + heads * d + 3 * inter) + S


@dataclass(frozen=True)
class DecodeLayerWeights:
    """A decoder layer's parameters as ``decode_layer`` reads them (fp32, contiguous, checked once
    by ``layer_weights``): norms, q/k/v (biases optional, Qwen2), o, gate, up, down."""

    heads: int
    norm1: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    wo: torch.Tensor
    norm2: torch.Tensor
    wg: torch.Tensor
    wu: torch.Tensor
    wd: torch.Tensor


def layer_weights(heads: int, **tensors: torch.Tensor | None) -> DecodeLayerWeights | None:
    """The layer's weights for ``decode_layer``, or None when one of them cannot be read as it is
    (not a contiguous fp32 CPU tensor), when torch runs several threads or the kernel is
    unavailable: then the caller decodes with torch."""
    w = DecodeLayerWeights(heads=heads, **tensors)
    hidden = w.wq.shape[1]
    for name, t in tensors.items():
        if t is None and name in ("bq", "bk", "bv"):
            continue
        if t is None or t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            return None
    shapes_ok = (
        w.wk.shape == w.wv.shape
        and w.wk.shape[1] == hidden
        and w.wo.shape == (hidden, w.wq.shape[0])
        and w.norm1.shape == w.norm2.shape == (hidden,)
        and w.wg.shape == w.wu.shape
        and w.wg.shape[1] == hidden
        and w.wd.shape == (hidden, w.wg.shape[0])
        and w.wq.shape[0] % heads == 0
        and all(b is None or b.shape == (len(m),) for b, m in ((w.bq, w.wq), (w.bk, w.wk), (w.bv, w.wv)))
    )
    if not shapes_ok or torch.get_num_threads() != 1 or not available():
        return None
    return w
