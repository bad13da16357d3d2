"""What a network costs: parameters, FLOPs and CPU latency, measured the same way for every model.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per multiply-add
(fvcore, thop and ptflops report multiply-adds, half as many) and misses pooling and elementwise
work; latency is therefore measured too, with `torch.utils.benchmark.Timer.blocked_autorange`. It
has no formula for the CPU kernel of fused scaled-dot-product attention, whose Q K^T and A V products
would count zero (a sixth of ViT-B's FLOPs at 448 px): `count_flops` gives that kernel the formula
torch uses for its GPU kernels, the products' FLOPs as if computed as matrix multiplications.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def count_parameters(*modules: nn.Module | None) -> int:
    """Parameters of the given modules together (None entries are skipped)."""
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def count_flops(fn: Callable[[Tensor], object], x: Tensor) -> int:
    """FLOPs (2 per multiply-add) of one inference call fn(x), backward work inside it (the DCN's
    saliency) included; fused CPU attention counted as its matrix products (module docstring)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FUSED_ATTENTION_FLOPS) as counter:
        fn(x)
    return int(counter.get_total_flops())


def _fused_cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """softmax(Q K^T) V's two matrix products, as torch counts them for its GPU attention kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter has formulas for the GPU attention kernels but not for this CPU one
FUSED_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _fused_cpu_attention_flops}


@dataclass
class Latency:
    median_ms: float
    iqr_ms: float  # interquartile range of the per-call times

    def __str__(self) -> str:
        return f"{self.median_ms:.1f} ± {self.iqr_ms / 2:.1f}"


def time_calls(fn: Callable[[Tensor], object], x: Tensor, min_run_time: float = 1.0,
               num_threads: int = 1) -> list[float]:
    """Per-call seconds of fn(x) without autograd, from one `blocked_autorange` (after one warm-up
    call) on `num_threads` threads (torch.utils.benchmark's default is one)."""
    from torch.utils.benchmark import Timer  # imported here: it warns about CUDA on CPU-only machines

    with torch.no_grad():
        fn(x)
        timer = Timer(stmt="fn(x)", globals={"fn": fn, "x": x, "torch": torch}, num_threads=num_threads)
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return list(measurement.times)


def summarize(times: list[float]) -> Latency:
    """Median and interquartile range in milliseconds."""
    if len(times) < 2:
        return Latency(times[0] * 1e3, 0.0)
    q1, _, q3 = statistics.quantiles(times, n=4)
    return Latency(statistics.median(times) * 1e3, (q3 - q1) * 1e3)


def interleaved_latency(fns: dict[str, Callable[[Tensor], object]], x: Tensor, rounds: int = 3,
                        min_run_time: float = 1.0, num_threads: int = 1) -> dict[str, Latency]:
    """Latency of several callables on the same input, timed in alternating rounds so that a change
    in machine load during the run affects them all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += time_calls(fn, x, min_run_time, num_threads)
    return {name: summarize(t) for name, t in times.items()}
