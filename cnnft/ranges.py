"""Every number cnnft takes, declared once: whole or real, finite, and in a range that makes
sense, with a message that says the range.

A :class:`Range` is used three ways, so a config key and the command-line option that means
the same thing can never disagree: ``.t`` is the pydantic type of a schema field (config.py and
the checkpoint/export schemas), ``.parse`` reads a command-line value (cli/base.py turns it
into an option), and ``.problem`` checks a value already in hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, AllowInfNan, BeforeValidator, Strict
from pydantic_core import PydanticCustomError


def _number(v: Any) -> Any:
    # Python's bool is an int, so `epochs: true` would silently become 1
    if isinstance(v, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return v


def _fmt(x: float) -> str:
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:g}"


@dataclass(frozen=True)
class Range:
    """A number's kind (``int`` or ``float``) and bounds; ``off`` is one value allowed outside
    them that switches the feature off (``mixup: 0``)."""

    kind: type = float
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    off: float | None = None

    def text(self) -> str:
        """The range in words: 'a number > 0 and <= 10', 'a whole number from 1 to 1,000,000'."""
        what = "a whole number" if self.kind is int else "a finite number"
        if self.ge is not None and self.le is not None:
            rng = f"from {_fmt(self.ge)} to {_fmt(self.le)}"
        else:
            parts = [f"{op} {_fmt(b)}" for op, b in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                     if b is not None]
            rng = " and ".join(parts)
        off = f" (or {_fmt(self.off)}: off)" if self.off is not None else ""
        return f"{what} {rng}{off}".rstrip()

    def _fails(self, v: float) -> tuple[str, str] | None:
        """(pydantic error type, what is wrong) when ``v`` is outside the range."""
        if self.off is not None and v == self.off:
            return None
        if isinstance(v, float) and not math.isfinite(v):
            return "finite_number", "Input should be a finite number"
        for kind, bound, bad, words in (("greater_than", self.gt, lambda b: v <= b, "greater than"),
                                        ("greater_than_equal", self.ge, lambda b: v < b, "greater than or equal to"),
                                        ("less_than", self.lt, lambda b: v >= b, "less than"),
                                        ("less_than_equal", self.le, lambda b: v > b, "less than or equal to")):
            if bound is not None and bad(bound):
                plain = int(bound) if float(bound).is_integer() else bound  # as pydantic says it
                return kind, f"Input should be {words} {plain}"
        return None

    def problem(self, v: Any) -> str | None:
        """What is wrong with ``v`` (the range included), or None when it fits."""
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.kind is int and not isinstance(v, int)):
            return f"must be {self.text()}"
        fails = self._fails(v)
        return None if fails is None else f"{fails[1]}; allowed: {self.text()}"

    def _check(self, v: Any) -> Any:
        fails = self._fails(v)
        if fails is not None:
            raise PydanticCustomError(fails[0], "{msg}; allowed: {range}", {"msg": fails[1], "range": self.text()})
        return v

    @property
    def t(self) -> Any:
        """The pydantic type: strict int, or float (ints and numeric strings taken, bools not);
        inf and nan reach the range check, which names the range."""
        base = Annotated[int, Strict()] if self.kind is int else Annotated[float, AllowInfNan(True), BeforeValidator(_number)]
        return Annotated[base, AfterValidator(self._check)]

    def parse(self, text: str) -> Any:
        """A command-line value: raises ValueError with the range when it is not one."""
        if not isinstance(text, str):  # a default, already a number
            return text
        try:
            v = int(text.strip().replace("_", "")) if self.kind is int else float(text)
        except ValueError:
            raise ValueError(f"got {text!r}: must be {self.text()}") from None
        if self._fails(v) is not None:
            raise ValueError(f"got {text}: must be {self.text()}")
        return v


# --- the numbers themselves, by meaning; config.py and the CLI options share them
LR = Range(float, gt=0, le=10)
LR_SCALE = Range(float, gt=0, le=1)  # backbone_lr_scale, layer_decay
FRACTION_OPEN = Range(float, gt=0, lt=1)  # val_split, ema
FRACTION = Range(float, ge=0, lt=1)  # momentum, label_smoothing
WEIGHT_DECAY = Range(float, ge=0, le=10)
WARMUP_EPOCHS = Range(float, ge=0, le=100_000)
MIX_ALPHA = Range(float, ge=0.01, le=100, off=0)  # mixup/cutmix Beta(alpha, alpha); below 0.01 it draws 0 or 1 only
GRAD_CLIP = Range(float, gt=0, le=1e6)
CLASS_WEIGHT = Range(float, gt=0, le=1e6)
EPOCHS = Range(int, ge=1, le=100_000)
PATIENCE = Range(int, ge=1, le=100_000)
IMAGE_SIZE = Range(int, ge=16, le=1024)
BATCH_SIZE = Range(int, ge=1, le=1_000_000)
WORKERS = Range(int, ge=0, le=1024)
IMAGES_PER_CLASS = Range(int, ge=1, le=1_000_000_000)
IMAGES = Range(int, ge=1, le=1_000_000_000_000)
CLASSES = Range(int, ge=2, le=1_000_000)
STAGES = Range(int, ge=0, le=1000)
CACHE_VIEWS = Range(int, ge=1, le=1000)
CACHE_BUDGET_MB = Range(int, ge=0, le=100_000_000)
SEED = Range(int, ge=0, le=2**32 - 1)  # numpy's seed range; torch overflows above 2**63
TOP_K = Range(int, ge=1, le=1_000_000)
SWEEP_STEPS = Range(int, ge=10, le=100_000)
PROCESSES = Range(int, ge=1, le=1024)
# the search (config's tune: section, cnnft tune)
SEARCH_BOUND = Range(float, ge=-1e9, le=1e9)  # an end of a searched range {low, high}
GRACE_EPOCHS = Range(int, ge=1, le=1000)
REDUCTION_FACTOR = Range(int, ge=2, le=100)
HEARTBEAT_SECONDS = Range(int, ge=1, le=3600)
TRIALS = Range(int, ge=1, le=1_000_000)
TUNE_WORKERS = Range(int, ge=1, le=256)
NEAR_THRESHOLD = Range(float, gt=0, le=1)  # cosine similarity (cnnft check)
