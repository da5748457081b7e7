"""The CPU features that decide which precision runs fastest here, as the runtimes will see them.

`export` records them beside its measured choice (model.json's serving.cpu); the server compares them
with its own CPU's at load time (server/variant_choice.py). The flags are /proc/cpuinfo's, less what
ONEDNN_MAX_CPU_ISA hides: OpenVINO's CPU plugin (oneDNN) honours that variable, so a process started
with ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI runs neither AMX nor AVX-512 BF16 kernels and must not choose
as if it did.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

# The flags that matter: VNNI (INT8 dot products), AVX-512 BF16, AMX tiles for BF16 and INT8.
FLAGS: tuple[str, ...] = ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# oneDNN's ISA names, in order; a flag survives a cap at or above the level that introduced it.
_ISA_ORDER = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
    "ALL",
)
_FLAG_LEVEL = {
    "avx512_vnni": "AVX512_CORE_VNNI",
    "avx512_bf16": "AVX512_CORE_BF16",
    "amx_bf16": "AVX512_CORE_AMX",
    "amx_int8": "AVX512_CORE_AMX",
}


class CpuInfo(BaseModel):
    """What a measurement ran on: the flags above (True where usable) and the logical core count."""

    model_config = ConfigDict(extra="forbid")

    flags: dict[str, bool]
    cores: int
    max_isa: str = ""  # ONEDNN_MAX_CPU_ISA when it was set

    def has(self, flag: str) -> bool:
        return bool(self.flags.get(flag, False))

    def computes_bf16(self) -> bool:
        """Whether oneDNN has bfloat16 instructions here (AVX-512 BF16 or AMX); without them OpenVINO's
        BF16 hint silently runs FP32."""
        return self.has("avx512_bf16") or self.has("amx_bf16")

    def same_features(self, other: CpuInfo) -> bool:
        return all(self.has(f) == other.has(f) for f in FLAGS)

    def summary(self) -> str:
        on = [f for f in FLAGS if self.has(f)] or ["none of " + "/".join(FLAGS)]
        cap = f", ONEDNN_MAX_CPU_ISA={self.max_isa}" if self.max_isa else ""
        return f"{', '.join(on)}; {self.cores} cores{cap}"


def _cpuinfo_flags(text: str) -> set[str]:
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _allowed(flag: str, max_isa: str) -> bool:
    if not max_isa or max_isa.upper() not in _ISA_ORDER:
        return True
    return _ISA_ORDER.index(max_isa.upper()) >= _ISA_ORDER.index(_FLAG_LEVEL[flag])


def current_cpu(cpuinfo: str | None = None, max_isa: str | None = None) -> CpuInfo:
    """This machine's CpuInfo (both arguments default to this process's /proc/cpuinfo and environment)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    if max_isa is None:
        max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    present = _cpuinfo_flags(cpuinfo)
    return CpuInfo(
        flags={f: f in present and _allowed(f, max_isa) for f in FLAGS},
        cores=os.cpu_count() or 1,
        max_isa=max_isa.upper(),
    )
