"""Which recorded variant a CPU should serve (server/variant_choice.py applies it to a model's config;
export/runtimes.served_runner runs the same choice in-process for tests and benchmarks).

model.json records the CPU export measured on (serving.cpu) and every gated variant, fastest first,
with the CPU flags each needs to beat FP32 (serving.variants). Where this CPU's flags differ, the first
recorded variant whose needs it meets, and whose gate ran on the same INT8/BF16 kernels (`gated_on`), is
served (FP32 needs nothing, so there always is one); a choice pinned at export, or one measured on a
CPU with the same flags, stands.
"""

from __future__ import annotations

from dataclasses import dataclass

from cnncore.cpu import CpuInfo, current_cpu
from cnncore.spec import GatedVariant, ModelMeta


@dataclass(frozen=True)
class Reselection:
    variant: GatedVariant
    reason: str


def reselect(meta: ModelMeta | None, cpu: CpuInfo | None = None) -> Reselection | None:
    """The variant to serve instead of the recorded choice, or None to keep the recorded choice."""
    serving = meta.serving if meta is not None else None
    if serving is None or serving.pinned or serving.cpu is None or not serving.variants:
        return None
    cpu = cpu or current_cpu()
    if cpu.same_features(serving.cpu):
        return None
    usable = [
        v
        for v in serving.variants
        if all(cpu.has(f) for f in v.needs) and all(cpu.has(f) == on for f, on in v.gated_on.items())
    ]
    if not usable:
        return None
    best = usable[0]
    if (best.precision, best.runtime) == (serving.precision, serving.runtime):
        return None
    skipped = [
        f"{v.precision}/{v.runtime} ({_unmet(v, cpu)})" for v in serving.variants[: serving.variants.index(best)]
    ]
    reason = (
        f"measured on {serving.cpu.summary()}, serving on {cpu.summary()}: "
        f"{serving.precision}/{serving.runtime} -> {best.precision}/{best.runtime}"
        + (f"; not {', '.join(skipped)}" if skipped else "")
    )
    return Reselection(best, reason)


def _unmet(v: GatedVariant, cpu: CpuInfo) -> str:
    missing = [f for f in v.needs if not cpu.has(f)]
    differ = [f"{f} {'present' if on else 'absent'}" for f, on in v.gated_on.items() if cpu.has(f) != on]
    return "; ".join(
        ([f"needs {'/'.join(missing)}"] if missing else []) + ([f"gated with {', '.join(differ)}"] if differ else [])
    )
