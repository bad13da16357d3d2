"""The output contract between models and the engine.

A model's `forward(images)` returns either a logits tensor (B, num_classes) or a dataclass with a
`logits` field (the final prediction, (B, num_classes)). A dataclass may also define
`named_logits() -> dict[str, Tensor]`: further predictions the evaluator scores by name
(`top1_scale0`, `top1_coarse`, ...).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def final_logits(output: Any) -> Tensor:
    """(B, num_classes) final logits of any model output."""
    return output if isinstance(output, Tensor) else output.logits


def named_logits(output: Any) -> dict[str, Tensor]:
    """Further scored predictions of a multi-output model, by name; {} for a plain classifier."""
    fn = getattr(output, "named_logits", None)
    return fn() if fn is not None else {}
