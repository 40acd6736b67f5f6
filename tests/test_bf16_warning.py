"""bf16 on a CPU without bf16 instructions is emulated and slow: a run says so in one line when it starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbabu.cli import main
from fedbabu.engine import hardware

AVX2_ONLY = frozenset(["fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "f16c", "fma", "avx2", "bmi1", "bmi2"])
"""The flags of an AMD EPYC with AVX2 but neither AVX512-BF16 nor AMX (the machine bf16 was measured on)."""
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        (AVX2_ONLY, False),
        (AVX2_ONLY | {"avx512f", "avx512bw"}, False),  # AVX-512 without its bf16 extension
        (AVX2_ONLY | {"avx512_bf16"}, True),
        (AVX2_ONLY | {"amx_tile", "amx_bf16"}, True),
        (AVX2_ONLY | {"amx_tile", "amx_int8"}, False),  # AMX tiles for int8 only
        (SAPPHIRE_RAPIDS, True),
    ],
)
def test_native_bf16_needs_avx512_bf16_or_amx_bf16(flags, native):
    assert hardware.native_bf16(flags) is native


def test_only_bf16_on_a_cpu_known_to_lack_it_is_warned_about():
    assert "AVX512-BF16 or AMX" in hardware.bf16_warning("bf16", "cpu", AVX2_ONLY)
    assert hardware.bf16_warning("bf16", "cpu", SAPPHIRE_RAPIDS) is None
    assert hardware.bf16_warning("fp32", "cpu", AVX2_ONLY) is None
    assert hardware.bf16_warning("bf16", "cuda", AVX2_ONLY) is None
    assert hardware.bf16_warning("bf16", "cpu", None) is None  # flags unknown: no claim


def test_flags_come_from_the_flags_line_of_cpuinfo_and_are_unknown_elsewhere(tmp_path: Path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert hardware.cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert hardware.cpu_flags(arm) is None
    assert hardware.cpu_flags(tmp_path / "absent") is None


@pytest.mark.parametrize(("flags", "precision", "warned"),
                         [(AVX2_ONLY, "bf16", True), (SAPPHIRE_RAPIDS, "bf16", False), (AVX2_ONLY, "fp32", False)])
def test_a_run_warns_once_on_stderr_when_bf16_would_be_emulated(flags, precision, warned, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    folder = tmp_path / "run"
    assert main(["run", "--quiet", "--out", str(folder), "--set", f"precision={precision}", "--set", "rounds=1",
                 "--set", "num_clients=5", "--set", "finetune.epochs=1", "--workers", "1"]) == 0
    lines = capsys.readouterr().err.splitlines()
    warnings = [line for line in lines if line.startswith("warning:")]
    if warned:
        assert len(warnings) == 1, lines
        assert warnings[0].startswith("warning: precision bf16 on a CPU without bf16 instructions (no AVX512-BF16 "
                                      "or AMX)")
        assert "precision bf16 on a CPU without bf16 instructions" in (folder / "events.log").read_text()
    else:
        assert warnings == [], lines
