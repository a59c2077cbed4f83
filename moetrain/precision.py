"""Training precision: which compute dtype a run uses, and the autocast region it runs in.

Owns: resolving ``train.precision`` (``auto | fp32 | bf16``) to a compute dtype for a device,
the check that bf16 is native there, the autocast context of the forward pass, and the
helpers that keep chosen regions in fp32 or cast payloads to the compute dtype.

Policy (mixed precision with fp32 master weights):

- Parameters, gradients and optimizer state stay float32: the optimizer (and ZeRO) only ever
  see fp32 tensors. The forward runs inside ``torch.autocast(device_type, torch.bfloat16)``,
  so every matmul (linear, attention, experts) computes in bf16 on bf16 copies of the weights;
  autograd casts the gradients back to fp32 on the way to the parameters.
- The residual stream and the RMSNorms stay float32 (autocast leaves non-matmul ops in their
  input dtype, and the embedding is fp32), which keeps the sum of many blocks accurate.
- The router (gate logits, softmax, top-k, weights) runs with autocast disabled
  (:func:`fp32_compute`); the LM loss, load-balancing loss and z-loss are computed outside the
  autocast region, in fp32 (``RankTrainer``).
- All-to-all payloads travel in the compute dtype: the dispatchers call :func:`to_compute` at
  entry, so the autograd all-to-all carries bf16 both ways (half the bytes of fp32).

``auto`` is bf16 where bf16 matmul is native, else fp32. Native means: CUDA compute capability
>= 8.0; on CPU the AMX-BF16 or AVX512-BF16 instructions (torch's cpuinfo check), and oneDNN
not capped below them by ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA`` (measured on this
project's CPUs: a 1024x512x1024 bf16 matmul runs at 213 GFLOP/s natively, 26 GFLOP/s with
``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` and 0.9 GFLOP/s with ``AVX2``: emulated bf16 is slower than
fp32). ``bf16`` where it is not native raises :class:`ConfigError` naming ``train.precision``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

from moetrain.config import ConfigError

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIN_CUDA_CAPABILITY_BF16 = (8, 0)  # Ampere
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA values) that still include native bf16 matmul.
_ONEDNN_BF16_ISAS = frozenset(
    {
        "ALL",
        "DEFAULT",
        "AVX512_CORE_BF16",
        "AVX512_CORE_FP16",
        "AVX512_CORE_AMX",
        "AVX512_CORE_AMX_FP16",
        "AVX10_1_512",
        "AVX10_1_512_AMX",
        "AVX10_1_512_AMX_FP16",
        "AVX10_2_512",
        "AVX10_2_512_AMX_2",
    }
)
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpu_has_bf16_instructions() -> bool:
    """AMX-BF16 or AVX512-BF16 in this CPU (torch's cpuinfo; /proc/cpuinfo flags as fallback)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if amx is not None and avx is not None:
        return bool(amx() or avx())
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    return any(f in flags for f in _CPU_BF16_FLAGS)


def _onednn_allows_bf16() -> bool:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL"
    return cap.strip().upper() in _ONEDNN_BF16_ISAS


def bf16_native(device: torch.device | str) -> tuple[bool, str]:
    """(native?, reason) for bf16 matmul on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        cap = torch.cuda.get_device_capability(device)
        ok = cap >= MIN_CUDA_CAPABILITY_BF16
        return ok, f"CUDA compute capability {cap[0]}.{cap[1]} ({'>=' if ok else '<'} 8.0)"
    if device.type != "cpu":
        return False, f"device type {device.type!r} is not checked for bf16"
    if not _cpu_has_bf16_instructions():
        return False, "this CPU has neither AMX-BF16 nor AVX512-BF16"
    if not _onednn_allows_bf16():
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
        return False, f"oneDNN is capped below bf16 instructions (ONEDNN_MAX_CPU_ISA={isa})"
    return True, "CPU with AMX-BF16 or AVX512-BF16"


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype of ``train.precision`` on ``device``; raises :class:`ConfigError`
    naming the field for an unknown value or bf16 where it is not native."""
    if precision not in ("auto", *PRECISION_DTYPES):
        raise ConfigError(f"train.precision ({precision!r}) must be one of auto, fp32, bf16")
    if precision == "fp32":
        return torch.float32
    native, why = bf16_native(device)
    if precision == "auto":
        return torch.bfloat16 if native else torch.float32
    if not native:
        raise ConfigError(
            f"train.precision (bf16) needs native bf16 matmul on {torch.device(device)}: {why}; use fp32 or auto"
        )
    return torch.bfloat16


def autocast(dtype: torch.dtype, device: torch.device | str):
    """The forward's precision region: autocast to ``dtype``, or nothing for fp32."""
    device = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compute_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type`` here, or None outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def to_compute(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the active autocast dtype of its device (unchanged outside autocast): what
    dispatchers call at entry so all-to-all payloads travel in bf16."""
    dtype = compute_dtype(x.device.type)
    return x if dtype is None or not x.is_floating_point() else x.to(dtype)


def fp32_compute(fn):
    """Decorator: run ``fn`` with autocast disabled on CPU and CUDA (router, losses)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            return fn(*args, **kwargs)

    return wrapper


def check_run_precision(precision: str, use_gpu: bool) -> None:
    """Driver-side check before any actor starts: ``train.precision`` must be possible on the
    ranks' device kind as far as this machine can tell (CPU ranks: this CPU; GPU ranks: this
    GPU if the driver has one). Every rank checks its own device again
    (``RankTrainer``), which catches a heterogeneous cluster. Raises :class:`ConfigError`."""
    if use_gpu and not torch.cuda.is_available():
        return  # no GPU on the driver to look at: the ranks decide
    resolve_precision(precision, "cuda" if use_gpu else "cpu")
