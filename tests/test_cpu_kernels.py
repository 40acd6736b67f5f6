"""fp32 rounding depends on the CPU kernels: runs record theirs, and redoing part of a run on others says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_config

from fedbabu.cli import main
from fedbabu.engine import hardware
from fedbabu.runner import run_experiment

AVX2_ONLY = frozenset(["sse4_2", "avx", "fma", "avx2"])
AVX512 = AVX2_ONLY | hardware.AVX512_CORE


@pytest.mark.parametrize(
    ("flags", "cap", "isa"),
    [
        (AVX2_ONLY, None, "AVX2"),
        (AVX2_ONLY, "AVX512_CORE", "AVX2"),  # a cap above the CPU changes nothing
        (AVX512, None, "AVX512"),
        (AVX512, "", "AVX512"),
        (AVX512, "AVX2", "AVX2"),
        (AVX512, "avx2_vnni", "AVX2"),
        (AVX512, "AVX512_CORE_AMX", "AVX512"),
        (AVX512, "SSE41", "SSE41"),
        (AVX2_ONLY, "SSE41", "SSE41"),  # a cap below the CPU lowers an AVX2 CPU too
        (AVX2_ONLY | {"avx512f"}, None, "AVX2"),  # AVX-512 without the subsets oneDNN needs
        (None, "AVX2", None),  # flags unknown: no claim
    ],
)
def test_onednn_uses_the_widest_isa_the_cpu_has_lowered_by_its_cap(flags, cap, isa):
    assert hardware.onednn_isa(flags, cap) == isa


def test_a_difference_in_either_kernel_is_one_line_and_nothing_else_is():
    avx2 = {"aten": "AVX2", "onednn": "AVX2"}
    avx512 = {"aten": "AVX512", "onednn": "AVX512"}
    assert hardware.kernels_warning(avx2, avx2, "cpu") is None
    assert hardware.kernels_warning(avx2, avx512, "cuda") is None
    assert hardware.kernels_warning(None, avx512, "cpu") is None  # a run of an earlier build recorded nothing
    assert hardware.kernels_warning({"aten": "AVX2", "onednn": None}, {"aten": "AVX2", "onednn": "AVX512"},
                                    "cpu") is None
    message = hardware.kernels_warning(avx2, avx512, "cpu")
    assert "aten AVX2 then, AVX512 now; onednn AVX2 then, AVX512 now" in message
    assert hardware.MATCH_KERNELS in message and "\n" not in message
    only_onednn = hardware.kernels_warning(avx512, {"aten": "AVX512", "onednn": "AVX2"}, "cpu")
    assert "onednn AVX512 then, AVX2 now" in only_onednn and "aten" not in only_onednn
    assert hardware.MATCH_KERNELS not in only_onednn  # nothing can raise the kernels above what the run had


def test_another_maker_of_cpu_is_named_even_with_the_same_kernels():
    amd = {"aten": "AVX2", "onednn": "AVX2", "vendor": "AuthenticAMD"}
    intel = {**amd, "vendor": "GenuineIntel"}
    message = hardware.kernels_warning(amd, intel, "cpu")
    assert message.startswith("the run was trained with other CPU kernels (vendor AuthenticAMD then, GenuineIntel "
                              "now): results will match it only to rounding")
    assert "another maker" in message and hardware.MATCH_KERNELS not in message and "\n" not in message
    assert hardware.kernels_warning(amd, amd, "cpu") is None
    assert hardware.kernels_warning({"aten": "AVX2", "onednn": "AVX2"}, intel, "cpu") is None  # maker not recorded
    both = hardware.kernels_warning(amd, {**intel, "aten": "AVX512", "onednn": "AVX512"}, "cpu")
    assert hardware.MATCH_KERNELS in both and "another maker" in both


def test_the_cpu_maker_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2\n\nprocessor\t: 1\n"
                       "vendor_id\t: GenuineIntel\n")
    assert hardware.cpuinfo_field("vendor_id", cpuinfo) == "GenuineIntel"
    assert hardware.cpu_flags(cpuinfo) == frozenset({"fpu", "avx2"})
    assert hardware.cpuinfo_field("vendor_id", tmp_path / "absent") is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kernels") / "run"
    run_experiment(small_config(rounds=2), folder)
    return folder


def test_a_run_records_the_kernels_it_computed_with(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["environment"]["cpu_kernels"] == hardware.cpu_kernels()


def test_personalizing_a_run_of_other_kernels_warns_once_and_the_same_kernels_not_at_all(trained, tmp_path,
                                                                                          capsys):
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(trained, same)
    shutil.copytree(trained, other)
    summary = json.loads((other / "summary.json").read_text())
    current = summary["environment"]["cpu_kernels"]
    summary["environment"]["cpu_kernels"] = {**current, "aten": "NOT" + current["aten"]}
    (other / "summary.json").write_text(json.dumps(summary))

    def warnings(folder: Path) -> list[str]:
        assert main(["personalize", str(folder), "--quiet", "--workers", "1"]) == 0
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]

    assert warnings(same) == []
    lines = warnings(other)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: the run was trained with other CPU kernels (aten NOT{current['aten']} "
                               f"then, {current['aten']} now)")


@pytest.mark.skipif("avx2" not in (hardware.cpu_flags() or ()), reason="needs a CPU with AVX2")
def test_the_documented_variables_hold_both_kernels_to_avx2(tmp_path):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    folder = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "fedbabu", "run", "--quiet", "--out", str(folder), "--workers", "1",
                    "--set", "rounds=1", "--set", "num_clients=5", "--set", "finetune.epochs=1"],
                   env=env, check=True, capture_output=True)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["environment"]["cpu_kernels"] == {"aten": "AVX2", "onednn": "AVX2",
                                                     "vendor": hardware.cpuinfo_field("vendor_id")}
