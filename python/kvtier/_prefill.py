"""Restore or recompute: an engine's prefill speed as its integration times it — a moving average,
and when it has moved far enough from what was declared to kvtierd to declare it again. Shared by
:mod:`kvtier.hf` and :mod:`kvtier.vllm` (whose worker times and whose scheduler declares)."""

from __future__ import annotations


class PrefillSpeed:
    SMOOTHING = 0.5   # weight of a new timing in the moving average
    REDECLARE = 0.25  # declare again once the average moves by more than this fraction

    def __init__(self) -> None:
        self.measured = 0.0  # tokens per second, 0 until a prefill is timed
        self.declared = 0.0  # what kvtierd was last told

    def add(self, tokens: int, seconds: float) -> None:
        """One timed prefill of ``tokens`` tokens."""
        if tokens > 0 and seconds > 0:
            self.set(tokens / seconds if not self.measured else
                     self.measured + self.SMOOTHING * (tokens / seconds - self.measured))

    def set(self, speed: float) -> None:
        """A moving average computed elsewhere (the vLLM worker's, on the scheduler)."""
        if speed > 0:
            self.measured = speed

    def due(self) -> bool:
        """Whether the measured speed should be declared (again)."""
        return self.measured > 0 and (not self.declared or
                                      abs(self.measured - self.declared) > self.REDECLARE * self.declared)
