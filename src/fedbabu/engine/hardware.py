"""What the CPU computes natively, for the two things that depend on it: bf16's speed and fp32's rounding.

bf16 autocast pays on CPUs with bf16 instructions (AVX512-BF16, or AMX's bf16 tiles) and on GPUs.
Elsewhere PyTorch emulates bf16 with fp32 arithmetic plus conversions, and a run is several times
slower than in fp32 (4convNet on one AVX2 core: 58 against 481 img/s), which a user would otherwise
find only by timing it; so a run on such a CPU says so when it starts.

Runs are bit-identical on one machine, but an AVX-512 CPU rounds fp32 differently from an AVX2 one
because PyTorch's own kernels (ATen) and oneDNN's convolutions each pick the widest instructions
they find. Both can be held to AVX2 (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, set
before Python starts): an AVX-512 machine then reproduces an AVX2 machine's training to the last
bit (measured: the first round's training loss of the results page's FedBABU run equal to all 16
digits, against a difference in the third decimal without them). That held between two AMD CPUs;
an Intel CPU held to the same kernels still rounds differently from them (measured: the first
round's loss differs in the fourth digit, with or without MKL held to AVX2 as well), since the
libraries also choose code paths and blockings by the CPU's maker and caches. So every run records
the kernels it computed with and the CPU's maker (:func:`cpu_kernels`), and work that redoes part
of a run elsewhere (personalizing it again, analyzing it) says in one line when either differs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from fedbabu.training import Runtime

log = logging.getLogger("fedbabu")

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(name: str, path: Path = CPUINFO) -> str | None:
    """The first value of one field of ``/proc/cpuinfo`` (``flags``, ``vendor_id``); None where unknown.

    Other systems, and Linux on CPUs that lack the field (ARM lists ``Features``, not ``flags``), give
    None: the caller then knows nothing and warns about nothing.
    """
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_flags(path: Path = CPUINFO) -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them (``flags`` in ``/proc/cpuinfo``); None where unknown."""
    flags = cpuinfo_field("flags", path)
    return None if flags is None else frozenset(flags.split())


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


AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
"""The AVX-512 subsets oneDNN needs before it uses AVX-512 kernels (its ``avx512_core``)."""
AVX512_CAPS = ("AVX512", "AVX10", "ALL", "DEFAULT")
"""Values of ``ONEDNN_MAX_CPU_ISA`` that let oneDNN use AVX-512 where the CPU has it."""
MATCH_KERNELS = "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"


def onednn_isa(flags: Iterable[str] | None, cap: str | None) -> str | None:
    """The instruction set oneDNN's fp32 kernels use: the CPU's widest, lowered by ``ONEDNN_MAX_CPU_ISA``.

    Coarse on purpose: AVX512 or AVX2 (or the cap's own name below those), which is what changes
    fp32 rounding for the networks here. None where the CPU's flags are unknown.
    """
    if flags is None:
        return None
    flags = set(flags)
    native = "AVX512" if flags >= AVX512_CORE else "AVX2" if "avx2" in flags else "older than AVX2"
    cap = (cap or "").strip().upper()
    if not cap or cap.startswith(AVX512_CAPS):
        return native
    if cap.startswith("AVX2"):
        return "AVX2" if native in ("AVX512", "AVX2") else native
    return cap


def cpu_kernels(flags: Iterable[str] | None = None, cap: str | None = None) -> dict[str, str | None]:
    """What this process's fp32 rounding on the CPU depends on: ATen's capability, oneDNN's ISA, the CPU's maker.

    ``flags`` and ``cap`` default to this machine's ``/proc/cpuinfo`` and ``$ONEDNN_MAX_CPU_ISA``;
    the maker is ``vendor_id`` (``GenuineIntel``, ``AuthenticAMD``), None where unknown.
    """
    flags = cpu_flags() if flags is None else flags
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") if cap is None else cap
    return {"aten": torch.backends.cpu.get_cpu_capability(), "onednn": onednn_isa(flags, cap),
            "vendor": cpuinfo_field("vendor_id")}


def kernels_warning(recorded: Mapping[str, str | None] | None, current: Mapping[str, str | None],
                    device: str) -> str | None:
    """One line when a run recorded other CPU kernels than this process has, or None.

    Nothing is claimed for CUDA, for a run of an earlier build (nothing recorded) or for a part
    either side does not know (runs of earlier builds did not record the CPU's maker).
    """
    if device != "cpu" or not recorded:
        return None
    differ = [name for name in ("aten", "onednn", "vendor")
              if recorded.get(name) and current.get(name) and recorded[name] != current[name]]
    if not differ:
        return None
    hints = []
    if set(differ) - {"vendor"} and "AVX2" in (recorded.get("aten"), recorded.get("onednn")):
        hints.append(f"on an AVX-512 machine of the same maker, {MATCH_KERNELS} (set before starting) computes as "
                     "an AVX2 machine does")
    if "vendor" in differ:
        hints.append("a CPU of another maker rounds differently even with the same kernels")
    changes = "; ".join(f"{name} {recorded[name]} then, {current[name]} now" for name in differ)
    return (f"the run was trained with other CPU kernels ({changes}): results will match it only to "
            f"rounding, not bit for bit" + "".join(f"; {hint}" for hint in hints))


def warn_if_kernels_differ(recorded: Mapping[str, str | None] | None, device: str) -> None:
    """Log :func:`kernels_warning` for this process against what a run recorded, when it applies."""
    message = kernels_warning(recorded, cpu_kernels(), device)
    if message is not None:
        log.warning(message)
