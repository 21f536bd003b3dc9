"""How long the sim's work takes, and the `timings` object llama-server reports for it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Speed:
    """The simulated hardware.

    Attributes:
        prefill_tokens_per_second: prompt evaluation speed of one slot.
        decode_tokens_per_second: generation speed of one slot while it is the only busy one.
        decode_slowdown: F in `speed / (1 + F * (busy_slots - 1))`: how much each further busy
            slot slows every slot's decoding, as a GPU's batches grow. 0 = slots are independent.
    """

    prefill_tokens_per_second: float = 2000.0
    decode_tokens_per_second: float = 50.0
    decode_slowdown: float = 0.0

    def prefill_seconds(self, n_tokens: int) -> float:
        """Time to evaluate `n_tokens` prompt tokens."""
        return n_tokens / self.prefill_tokens_per_second

    def decode_step_seconds(self, busy_slots: int) -> float:
        """Time to generate one token while `busy_slots` slots (this one included) are busy."""
        factor = 1.0 + self.decode_slowdown * max(busy_slots - 1, 0)
        return factor / self.decode_tokens_per_second


@dataclass(frozen=True, slots=True)
class Timings:
    """llama.cpp's per-request `timings`, from token counts and measured durations."""

    cache_n: int
    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float

    def to_json(self) -> dict[str, float | int]:
        """The `timings` object, with llama.cpp's derived rates (0.0 when undefined)."""
        return {
            "cache_n": self.cache_n,
            "prompt_n": self.prompt_n,
            "prompt_ms": self.prompt_ms,
            "prompt_per_token_ms": self.prompt_ms / self.prompt_n if self.prompt_n else 0.0,
            "prompt_per_second": 1e3 / self.prompt_ms * self.prompt_n if self.prompt_ms else 0.0,
            "predicted_n": self.predicted_n,
            "predicted_ms": self.predicted_ms,
            "predicted_per_token_ms": (
                self.predicted_ms / self.predicted_n if self.predicted_n else 0.0
            ),
            "predicted_per_second": (
                1e3 / self.predicted_ms * self.predicted_n if self.predicted_ms else 0.0
            ),
        }
