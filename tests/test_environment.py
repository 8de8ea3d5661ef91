"""Instruction-set detection from /proc/cpuinfo texts and the INT8 weight layout chosen for it."""

from __future__ import annotations

import pytest

from quantkit.environment import CpuIsa, cpu_isa, environment_info, parse_cpu_isa, weight_layout_for

# flags lines as these CPUs print them (abridged to the part that matters, plus neighbours)
EPYC_GENOA_VNNI = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model name	: AMD EPYC 9R14
flags		: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2 avx512f avx512dq \
avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni avx512_bitalg
"""
EPYC_MILAN_AVX2 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model name	: AMD EPYC
flags		: fpu vme de pse tsc msr pae sse sse2 ht syscall ssse3 fma cx16 sse4_1 sse4_2 \
movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm sse4a bmi1 avx2 smep bmi2 \
erms invpcid rdseed adx smap sha_ni vaes vpclmulqdq rdpid fsrm
processor	: 1
flags		: fpu vme de pse tsc msr pae sse sse2 avx avx2
"""
ALDER_LAKE_AVX_VNNI = """model name	: 12th Gen Intel(R) Core(TM) i7-12700
flags		: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx_vnni
"""
SKYLAKE_X_AVX512 = """model name	: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags		: fpu sse sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl
"""
OLD_X86 = """model name	: Intel(R) Core(TM)2 Duo CPU
flags		: fpu sse sse2 ssse3 sse4_1
"""
GRAVITON2_DOTPROD = """processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid \
asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer	: 0x41
"""
CORTEX_A53 = """processor	: 0
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
"""


@pytest.mark.parametrize(("text", "machine", "name", "saturates", "layout"), [
    (EPYC_GENOA_VNNI, "x86_64", "avx512_vnni", False, "s8"),
    (ALDER_LAKE_AVX_VNNI, "x86_64", "avx_vnni", False, "s8"),
    (SKYLAKE_X_AVX512, "x86_64", "avx512", True, "u8"),
    (EPYC_MILAN_AVX2, "x86_64", "avx2", True, "u8"),
    (OLD_X86, "x86_64", "x86", False, "u8"),
    (GRAVITON2_DOTPROD, "aarch64", "arm64_dotprod", False, "s8"),
    (CORTEX_A53, "aarch64", "arm64", False, "s8"),
])
def test_isa_and_layout_from_cpuinfo(text, machine, name, saturates, layout):
    isa = parse_cpu_isa(text, machine)
    assert isa.name == name
    assert isa.u8s8_saturates is saturates
    chosen, reason = weight_layout_for(isa)
    assert chosen == layout
    assert name in reason
    assert isa.to_dict()["u8s8_saturates"] is saturates


def test_isa_without_cpuinfo_or_machine_name():
    # no /proc/cpuinfo (macOS, Windows): x86 gets the layout that is exact on every x86 kernel
    unknown_x86 = parse_cpu_isa("", "AMD64")
    assert (unknown_x86.arch, unknown_x86.name, unknown_x86.source) == ("x86_64", "unknown", "none")
    assert weight_layout_for(unknown_x86)[0] == "u8"
    unknown_arm = parse_cpu_isa("", "arm64")
    assert (unknown_arm.arch, unknown_arm.name) == ("aarch64", "unknown")
    assert weight_layout_for(unknown_arm)[0] == "s8"
    # the flags alone tell x86 from ARM when the machine name is missing
    assert parse_cpu_isa(EPYC_MILAN_AVX2, "").name == "avx2"
    assert parse_cpu_isa(GRAVITON2_DOTPROD, "").name == "arm64_dotprod"
    other = parse_cpu_isa("flags : foo bar\n", "riscv64")
    assert (other.arch, other.name, weight_layout_for(other)[0]) == ("riscv64", "unknown", "s8")


def test_only_the_first_flags_line_counts_and_words_match_whole():
    # "avx512_vnni" must not be found inside another flag, nor "avx2" inside "avx512..."
    text = "flags : sse2 avx avx512_vnnix avx2x\nflags : avx2 avx512_vnni\n"
    assert parse_cpu_isa(text, "x86_64").name == "x86"
    assert weight_layout_for(parse_cpu_isa(text, "x86_64"))[0] == "u8"


def test_this_machine_is_recorded_in_the_environment():
    isa = cpu_isa()
    assert isinstance(isa, CpuIsa)
    env = environment_info()
    assert env["isa"] == isa.to_dict()
    assert isa.name in isa.describe()
