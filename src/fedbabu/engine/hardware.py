"""What the CPU computes natively, for the one setting whose speed depends on it: ``precision: bf16``.

bf16 autocast pays on CPUs with bf16 instructions (AVX512-BF16, or AMX's bf16 tiles) and on GPUs.
Elsewhere PyTorch emulates bf16 with fp32 arithmetic plus conversions, and a run is several times
slower than in fp32 (4convNet on one AVX2 core: 58 against 481 img/s), which a user would otherwise
find only by timing it; so a run on such a CPU says so when it starts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from fedbabu.training import Runtime

log = logging.getLogger("fedbabu")

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(path: Path = CPUINFO) -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them (``flags`` in ``/proc/cpuinfo``); None where unknown.

    Other systems, and Linux on CPUs that list ``Features`` instead (ARM), give None: the caller
    then knows nothing and warns about nothing.
    """
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def native_bf16(flags: Iterable[str]) -> bool:
    """Whether a CPU with these flags has bf16 instructions: AVX512-BF16, or AMX tiles with bf16."""
    flags = set(flags)
    return "avx512_bf16" in flags or {"amx_tile", "amx_bf16"} <= flags


def bf16_warning(precision: str, device: str, flags: Iterable[str] | None) -> str | None:
    """The one-line warning for bf16 on a CPU without bf16 instructions, or None (fp32, CUDA, unknown CPU)."""
    if precision != "bf16" or device != "cpu" or flags is None or native_bf16(flags):
        return None
    return ("precision bf16 on a CPU without bf16 instructions (no AVX512-BF16 or AMX): PyTorch emulates it, "
            "which is much slower than fp32 (measured about 8x: 58 vs 481 img/s for 4convNet on one AVX2 core); "
            "use precision fp32 on this machine")


def warn_if_bf16_is_emulated(runtime: Runtime) -> None:
    """Log :func:`bf16_warning` for this machine's CPU when it applies (the CLI shows it as one line)."""
    message = bf16_warning(runtime.precision, runtime.device, cpu_flags())
    if message is not None:
        log.warning(message)
