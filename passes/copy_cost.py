"""What one message costs a CPU rank's compute, as the simulator charges it.

Two models, one interface (``of(tensors, nbytes)`` seconds, ``free``, ``describe``):

- `CopyCost`: three linear terms, per message, per tensor and per byte. What a user
  gives as the ``copy_cost`` option (a triple) and what "not charged" is (all zero).
- `MeasuredCopyCost`: seconds per message measured on a grid of tensor counts × total
  bytes (`runtime.copy_probe`) and interpolated between them. Over gloo on CPU ranks
  the cost is not linear: 64 tensors in 64 MiB cost about what 8 tensors in 64 MiB
  cost, and large messages move at nearly twice the rate of 1 MiB ones, so three linear
  terms fitted on small messages charged 1F1B's 180 MiB boundaries 1.5-1.6× what they
  cost.

Kept apart from the probe so that the schedule passes need no torch.distributed.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Dict, Mapping, Sequence, Tuple, Union


@dataclass(frozen=True)
class CopyCost:
    """CPU seconds a rank spends on one message it sends or receives: ``per_message_s``
    (waking gloo's threads), plus ``per_tensor_s`` for each tensor in it, plus
    ``per_byte_s`` × its bytes (the kernel's copies)."""

    per_message_s: float = 0.0
    per_tensor_s: float = 0.0
    per_byte_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.per_message_s >= 0 and self.per_tensor_s >= 0 and self.per_byte_s >= 0):
            raise ValueError(f"copy costs must be >= 0, got {self}")

    def of(self, tensors: int, nbytes: float) -> float:
        """One message of ``tensors`` tensors and ``nbytes`` bytes in all."""
        if tensors <= 0:
            return 0.0
        return self.per_message_s + tensors * self.per_tensor_s + nbytes * self.per_byte_s

    @property
    def free(self) -> bool:
        return self.per_message_s == 0 and self.per_tensor_s == 0 and self.per_byte_s == 0

    def describe(self) -> str:
        if self.free:
            return "not charged"
        gbs = f"{1e-9 / self.per_byte_s:.3g} GB/s" if self.per_byte_s > 0 else "no per-byte cost"
        return f"{1e6 * self.per_message_s:.3g} µs per message + {1e6 * self.per_tensor_s:.3g} µs per tensor + {gbs}"

    def to_json(self) -> Dict[str, Any]:
        return {"kind": "linear", "per_message_s": self.per_message_s, "per_tensor_s": self.per_tensor_s, "per_byte_s": self.per_byte_s}


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """ys at x, linear between the points of xs (increasing) and along the first or last
    segment outside them; a single point is constant."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    w = (x - xs[i]) / (xs[i + 1] - xs[i])
    return (1 - w) * ys[i] + w * ys[i + 1]


@dataclass(frozen=True)
class MeasuredCopyCost:
    """Seconds per message measured at every (``tensors[i]``, ``nbytes[j]``) of a grid
    (``seconds[i][j]``), interpolated linearly in both between grid points.

    Beyond the largest size the cost grows along the last segment's slope per byte (large
    messages cost a steady rate), below the smallest it is the smallest's (a message's
    fixed cost); likewise in the tensor count. Each row is made non-decreasing in bytes
    (the probe's noise on small messages can put a larger one below a smaller one).
    """

    tensors: Tuple[int, ...]
    nbytes: Tuple[float, ...]
    seconds: Tuple[Tuple[float, ...], ...]

    def __post_init__(self) -> None:
        t, b, s = tuple(int(x) for x in self.tensors), tuple(float(x) for x in self.nbytes), self.seconds
        if not t or not b or list(t) != sorted(set(t)) or list(b) != sorted(set(b)) or t[0] < 1 or b[0] < 0:
            raise ValueError(f"a measured copy cost needs increasing tensor counts >= 1 and sizes >= 0, got {t} and {b}")
        if len(s) != len(t) or any(len(row) != len(b) for row in s):
            raise ValueError(f"a measured copy cost needs {len(t)} rows of {len(b)} seconds, got {[len(r) for r in s]}")
        if any(x < 0 for row in s for x in row):
            raise ValueError(f"copy costs must be >= 0, got {s}")
        rows = tuple(tuple(accumulate((float(x) for x in row), max)) for row in s)
        object.__setattr__(self, "tensors", t)
        object.__setattr__(self, "nbytes", b)
        object.__setattr__(self, "seconds", rows)

    def of(self, tensors: int, nbytes: float) -> float:
        """One message of ``tensors`` tensors and ``nbytes`` bytes in all."""
        if tensors <= 0:
            return 0.0
        size = max(float(nbytes), self.nbytes[0])  # below the smallest: a message's fixed cost
        per_count = [_interpolate(self.nbytes, row, size) for row in self.seconds]
        return max(0.0, _interpolate(self.tensors, per_count, max(tensors, self.tensors[0])))

    @property
    def free(self) -> bool:
        return all(x == 0 for row in self.seconds for x in row)

    def describe(self) -> str:
        small, big = self.seconds[0][0], self.seconds[-1][-1]
        rate = f"{self.nbytes[-1] / big / 1e9:.3g} GB/s" if big > 0 else "free"
        return (
            f"measured on {len(self.tensors)}×{len(self.nbytes)} message shapes: "
            f"{1e6 * small:.3g} µs for {self.tensors[0]} tensor of {_size(self.nbytes[0])}, "
            f"{1e3 * big:.3g} ms for {self.tensors[-1]} tensors in {_size(self.nbytes[-1])} ({rate})"
        )

    def to_json(self) -> Dict[str, Any]:
        return {"kind": "measured", "tensors": list(self.tensors), "nbytes": list(self.nbytes), "seconds": [list(r) for r in self.seconds]}


CopyModel = Union[CopyCost, MeasuredCopyCost]


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def copy_cost_from_json(data: Mapping[str, Any]) -> CopyModel:
    """Inverse of ``to_json`` of either model."""
    kind = data.get("kind")
    if kind == "linear":
        return CopyCost(float(data["per_message_s"]), float(data["per_tensor_s"]), float(data["per_byte_s"]))
    if kind == "measured":
        return MeasuredCopyCost(tuple(data["tensors"]), tuple(data["nbytes"]), tuple(tuple(r) for r in data["seconds"]))
    raise ValueError(f"unknown copy-cost kind {kind!r} (expected 'linear' or 'measured')")
