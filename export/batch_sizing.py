"""Batch sizes for config.pbtxt from the served variant's throughput per batch size on this machine.

After the variant to serve is chosen (export/variants.py), its runner (the one built for the variant
measurement, or one built here) runs batches of 1, 2, 4, 8 and, while larger batches still pay, 16 and
32 (never beyond the entry's max_batch_size or --max-batch-size), in interleaved rounds, best of each
(other processes only ever slow a measurement down). `size_batches` turns that curve into the config's
batching; the rule, a pure function of the curve:

- preferred_batch_size: the measured sizes (powers of two) from 2 up to the knee, the smallest batch
  whose throughput is within NEAR_BEST (10%) of the best. Beyond it a batch twice as large buys under
  10% throughput with twice the wait for its last request and the memory OpenVINO keeps for one more
  shape (on a quiet 2-core machine at 5% the detector went to 16 and the 28x28 models to 32: the
  default repository held 582 MiB once ready against 427-437 MiB with knees at 4 to 8). The batcher dispatches once
  a batch reaches the knee and otherwise takes the largest prefix whose size is preferred, so the
  runtime meets these shapes and 1 only, and the warm-up runs every one of them: OpenVINO keeps memory
  for each batch shape it has run (measured in-process, batches on two infer requests: mobilenet_v2
  INT8 153 MiB after every batch 1..8, 129 MiB after 1, 2, 4, 8; fashion_resnet20 INT8 139 MiB after
  1..16, 90 MiB after the powers of two), so a warmed server does not grow under load.
- max_batch_size: the preferred size, but not below MIN_MAX_BATCH (8), and never above the ceiling
  (the entry's or --max-batch-size). It is what a client may send in one request, so it does not
  follow the curve below 8: a client batching 8 images keeps working on a machine where batch 2 is
  already the best. An explicit --max-batch-size wins as it is.
- max_queue_delay_microseconds: QUEUE_DELAY_SHARE (1%) of the batch-1 latency, between 100 and 1000
  us. The batcher holds a lone request this long while the runtime is idle (server/scheduling/
  batcher.py), so a request pays at most 1% of its own compute for the chance of a partner; while the
  runtime is busy batches form without the delay. --max-queue-delay-us wins.
- warm-up: batch 1 (a lone request's path) and the preferred sizes: every batch the batcher forms
  from single-item requests.

model.json records the curve and what was derived (serving.batching), the config a one-line summary
(parameter `batch_sizing`), so `export describe` and the server's model config say why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cnncore.runtime import Runner, throughput
from cnncore.spec import BatchSizing
from export.repository import set_batching, warmup_batch_sizes
from protos.model_config_pb2 import ModelConfig

SIZING_BATCHES = (1, 2, 4, 8, 16, 32)
ALWAYS_MEASURED = 8  # sizes up to here are measured whatever the curve does; beyond, only while they pay
NEAR_BEST = 0.10
MIN_MAX_BATCH = 8
QUEUE_DELAY_SHARE = 0.01
QUEUE_DELAY_US = (100, 1000)
SIZING_ROUNDS = 3
SIZING_SECONDS = 0.3  # per batch size, over all rounds
SIZING_BUDGET_S = 6.0  # the whole curve, at most (a big model's batch 32 alone takes seconds)
PARAMETER = "batch_sizing"


@dataclass(frozen=True)
class BatchPins:
    """What the export command fixed: the ceiling always, the rest only when given explicitly."""

    ceiling: int  # the entry's max_batch_size, or --max-batch-size
    max_batch_size: int | None = None  # --max-batch-size
    preferred: tuple[int, ...] = ()
    queue_delay_us: int | None = None  # --max-queue-delay-us


def size_batches(curve: Mapping[int, float], pins: BatchPins) -> BatchSizing:
    """The batching for config.pbtxt from images/s per batch size (the rule in the module docstring)."""
    ceiling = pins.max_batch_size or pins.ceiling
    measured = {b: r for b, r in curve.items() if 0 < b <= ceiling and r > 0}
    why: list[str] = []
    if pins.preferred:
        preferred = sorted({b for b in pins.preferred if 0 < b <= ceiling}) or [ceiling]
        why.append("preferred sizes given")
    elif measured:
        best = max(measured.values())
        knee = min(b for b, r in measured.items() if r >= (1 - NEAR_BEST) * best)
        preferred = [b for b in sorted(measured) if 1 < b <= knee] or [1]
        best_at = max(measured, key=lambda b: measured[b])
        why.append(
            f"preferred up to {knee}: the smallest batch within {NEAR_BEST:.0%} of the best ({best:g} img/s at "
            f"{best_at}), and the measured sizes below it"
        )
    else:
        preferred = [min(ceiling, MIN_MAX_BATCH)]
        why.append("nothing measured: preferred min(8, ceiling)")
    if pins.max_batch_size is not None:
        max_batch = pins.max_batch_size
        why.append("max_batch_size given")
    else:
        max_batch = min(ceiling, max(MIN_MAX_BATCH, *preferred))
        why.append(f"max_batch_size {max_batch}: the preferred size, not below {MIN_MAX_BATCH}, at most {ceiling}")
    if pins.queue_delay_us is not None:
        delay = pins.queue_delay_us
        why.append("queue delay given")
    elif 1 in measured:
        latency_us = 1e6 / measured[1]
        delay = int(min(max(QUEUE_DELAY_SHARE * latency_us, QUEUE_DELAY_US[0]), QUEUE_DELAY_US[1]))
        why.append(f"queue delay {delay} us: {QUEUE_DELAY_SHARE:.0%} of batch 1's {latency_us / 1000:.2f} ms")
    else:
        delay = QUEUE_DELAY_US[0]
        why.append(f"queue delay {delay} us: batch 1 not measured")
    return BatchSizing(
        images_per_s={b: round(r, 1) for b, r in sorted(measured.items())},
        preferred_batch_sizes=preferred,
        max_batch_size=max_batch,
        max_queue_delay_us=delay,
        warmup_batch_sizes=warmup_batch_sizes(max_batch, preferred),
        rule="; ".join(why),
        ceiling=pins.ceiling,
    )


def measure_curve(
    run: Runner,
    sample: np.ndarray,
    ceiling: int,
    known: Mapping[int, float] | None = None,
    *,
    seconds: float = SIZING_SECONDS,
    rounds: int = SIZING_ROUNDS,
    budget_s: float = SIZING_BUDGET_S,
    sizes: Sequence[int] = SIZING_BATCHES,
) -> dict[int, float]:
    """Images/s of `run` per batch size up to `ceiling`, best of `rounds` interleaved rounds.

    The first round climbs the sizes: every one up to ALWAYS_MEASURED, the larger ones only while the
    last size beat the best so far by more than NEAR_BEST (past the curve's top they only take time),
    and none once `budget_s` is spent (batch 1 always). Later rounds measure those sizes again. `known`: figures
    measured already (the variant choice's batch 1 and 8), kept where higher."""
    curve = {b: r for b, r in (known or {}).items() if b <= ceiling}
    per_round = seconds / max(1, rounds)
    t0 = time.perf_counter()
    chosen: list[int] = []
    for b in (s for s in sizes if s <= ceiling):
        if chosen and time.perf_counter() - t0 > budget_s:
            break
        if b > ALWAYS_MEASURED and chosen:
            below = [curve[s] for s in chosen[:-1]]
            if below and curve[chosen[-1]] <= (1 + NEAR_BEST) * max(below):
                break
        curve[b] = max(curve.get(b, 0.0), throughput(run, sample, b, per_round, warmup=True, min_runs=1))
        chosen.append(b)
    for _ in range(rounds - 1):
        for b in chosen:
            if time.perf_counter() - t0 > budget_s:
                break
            curve[b] = max(curve[b], throughput(run, sample, b, per_round, warmup=False, min_runs=1))
    return {b: round(r, 1) for b, r in sorted(curve.items())}


def apply_sizing(cfg: ModelConfig, sizing: BatchSizing) -> None:
    """Write `sizing` into `cfg` in place: max_batch_size, dynamic_batching, warm-up, the parameter."""
    # the warm-up follows from the same two (repository.warmup_batch_sizes, as sizing.warmup_batch_sizes)
    set_batching(cfg, sizing.max_batch_size, sizing.preferred_batch_sizes, sizing.max_queue_delay_us)
    cfg.parameters[PARAMETER].string_value = describe_sizing(sizing)


def describe_sizing(s: BatchSizing) -> str:
    """One line for config.pbtxt's `batch_sizing` parameter and `export describe`."""
    curve = ", ".join(f"{b}: {r:g}" for b, r in sorted(s.images_per_s.items()))
    return f"images/s by batch (export machine) {curve or 'not measured'}; {s.rule}"
