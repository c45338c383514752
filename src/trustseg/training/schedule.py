"""Learning-rate schedule as pure functions: warmup by steps, then decay by the fraction of budget used.

The decay is a function of ``progress`` in [0, 1] rather than of the step, so one formula serves step
budgets (progress = steps done after warmup / steps left after warmup) and wall-clock budgets
(progress = elapsed / budget). As in torch's and mmsegmentation's schedulers the value reaches
``end_factor * lr`` when the budget is spent, i.e. at step ``total_steps``, one past the last update.
"""

from __future__ import annotations

import math

from trustseg.training.config import ScheduleConfig


def warmup_factor(schedule: ScheduleConfig, step: int) -> float:
    """Linear ramp from ``warmup_start_factor`` (step 0) towards 1 (step ``warmup_steps``)."""
    if step >= schedule.warmup_steps:
        return 1.0
    start = schedule.warmup_start_factor
    return start + (1.0 - start) * step / schedule.warmup_steps


def decay_factor(schedule: ScheduleConfig, progress: float) -> float:
    """1 at progress 0, ``end_factor`` at progress 1 (cosine, poly) or 1 throughout (constant)."""
    t = min(max(progress, 0.0), 1.0)
    end = schedule.end_factor
    if schedule.kind == "cosine":
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule.kind == "poly":
        return end + (1.0 - end) * (1.0 - t) ** schedule.power
    return 1.0


def step_progress(schedule: ScheduleConfig, step: int, total_steps: int) -> float:
    """Fraction of the post-warmup steps done before update ``step`` (0-based): 0 at the first
    post-warmup step, 1 at ``total_steps``."""
    span = total_steps - schedule.warmup_steps
    if span <= 0:
        return 1.0 if step >= total_steps else 0.0
    return (step - schedule.warmup_steps) / span


def lr_factor(
    schedule: ScheduleConfig,
    step: int,
    *,
    total_steps: int | None = None,
    elapsed_s: float = 0.0,
    budget_s: float | None = None,
) -> float:
    """Multiplier of the base LR for update ``step`` (0-based).

    With both a step and a time budget, the decay follows whichever is further along, matching the
    stopping rule (the run ends at whichever comes first).
    """
    progress = 0.0
    if total_steps is not None:
        progress = step_progress(schedule, step, total_steps)
    if budget_s is not None:
        progress = max(progress, elapsed_s / budget_s)
    if step < schedule.warmup_steps:
        return warmup_factor(schedule, step)
    return decay_factor(schedule, progress)
