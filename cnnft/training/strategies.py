"""The four fine-tuning strategies and how one is chosen: dataset size x similarity to
ImageNet, the latter given or measured (:func:`decide` reads a per-stage probe curve from
:mod:`cnnft.training.similarity`). Plain data, no torch: the config schema and the fast commands read it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from ..config import STRATEGIES  # the schema names them; this module chooses among them
from ..errors import ConfigError

# average images per class at or above which a dataset counts as "large"
LARGE_IMAGES_PER_CLASS = 1000

# freeze_most without a measurement: the last stage trains with the head
DEFAULT_TRAINABLE_STAGES = 1

# probe accuracy a deeper stage may lose against the best one and still count as "as good"
# (cross-validated accuracy on a few hundred images varies by about this much)
SIMILARITY_TOLERANCE = 0.02

QUADRANTS = {
    ("large", True): "freeze_early",
    ("large", False): "full",
    ("small", True): "head_only",
    ("small", False): "freeze_most",
}

RATIONALE = {
    "freeze_early": "Plenty of data close to ImageNet: the early generic stages (edges, textures) "
    "are already right, so they stay frozen while later stages and the head adapt.",
    "full": "Plenty of data unlike ImageNet: enough examples to retrain every layer without "
    "overfitting; pretrained weights are just a good starting point.",
    "head_only": "Little data close to ImageNet: the pretrained features already describe it, and "
    "fine-tuning them on few images would overfit. Train only the new head (feature extraction).",
    "freeze_most": "Little data unlike ImageNet: the generic early stages still help, but the last "
    "stage(s) must adapt to the new domain; everything before them stays frozen.",
}


def size_class(images: int, classes: int) -> str:
    """``large`` when there are at least LARGE_IMAGES_PER_CLASS images per class on average."""
    if images < 1 or classes < 1:
        raise ConfigError("--images and --classes must be positive integers")
    return "large" if images / classes >= LARGE_IMAGES_PER_CLASS else "small"


def recommend(size: str, similar: bool) -> str:
    """The strategy for a quadrant of the size x similarity table."""
    return QUADRANTS[(size, similar)]


def choose_strategy(requested: str, *, size: str | None, similar: bool | None, pretrained: bool = True,
                    weights: str = "none", size_reason: str | None = None) -> tuple[str, str | None]:
    """The strategy to use and why: ``requested`` unless it is ``auto``, which reads the
    size x similarity table; without pretrained weights there is nothing to keep: ``full``."""
    if requested != "auto":
        if not pretrained and requested != "full":
            return requested, (f"warning: freeze.strategy {requested} with model.weights {weights}: "
                               "the frozen layers keep random weights")
        return requested, None
    if not pretrained:  # nothing learnt to keep: freezing random layers only cripples the model
        return "full", f"auto: model.weights is {weights}, no pretrained layers to keep -> full"
    if size is None or similar is None:
        raise ConfigError("freeze.strategy: auto needs the dataset size (small|large) and whether it is "
                          "similar to ImageNet (freeze.similar)")
    strategy = recommend(size, similar)
    return strategy, f"auto: {size_reason or repr(size)}, {'similar' if similar else 'different'} -> {strategy}"


def resolve_batchnorm(setting: str, size: str, pretrained: bool) -> str:
    """``freeze.batchnorm`` for BatchNorm in the stages that train. ``auto``: ``eval`` (keep the
    pretrained running statistics; scale and shift still learn) for small datasets, ``train``
    for large ones and for random weights. With few images, batch statistics are noisy, and
    switching from the head phase's eval-mode features to batch statistics moves every
    feature the new head was fitted to (the Keras fine-tuning guide keeps BatchNorm in
    inference mode for this reason); a large dataset has the data to re-estimate them."""
    if setting != "auto":
        return setting
    return "eval" if pretrained and size == "small" else "train"


def frozen_names(
    names: Sequence[str], strategy: str, frozen_stages: int | None = None, trainable_stages: int = 1
) -> set[str]:
    """Names of the stages a strategy freezes, from the ordered stage names ``stem, stage1..K,
    head``. ``frozen_stages`` (freeze_early: how many stages after the stem; default half of
    them) and ``trainable_stages`` (freeze_most: how many last stages train with the head)
    count stages the same way for every architecture."""
    body = [n for n in names if n not in ("stem", "head")]
    k = len(body)
    if strategy == "full":
        return set()
    if strategy == "head_only":
        return {"stem", *body}
    if strategy == "freeze_early":
        n = k // 2 if frozen_stages is None else frozen_stages
        if not 0 <= n < k:
            raise ConfigError(
                f"freeze.frozen_stages: {n} is out of range for this model, which has {k} stages "
                f"after the stem ({', '.join(body)}); use 0..{k - 1}"
            )
        return {"stem", *body[:n]}
    if strategy == "freeze_most":
        if not 0 <= trainable_stages <= k:
            raise ConfigError(
                f"freeze.trainable_stages: {trainable_stages} is out of range for this model, which "
                f"has {k} stages after the stem ({', '.join(body)}); use 0..{k}"
            )
        return {"stem", *body[: k - trainable_stages]}
    raise ConfigError(f"freeze.strategy: unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


@dataclass(frozen=True)
class StageProbe:
    """How well a linear probe on one stage's pooled output separates the classes."""

    name: str
    width: int  # features: the stage's output channels
    acc_mean: float  # cross-validated accuracy
    acc_std: float  # its spread over the folds
    seconds: float  # this stage's probe (the forward pass is shared by all stages)


@dataclass(frozen=True)
class Decision:
    """The strategy a measured probe curve gives, and the evidence."""

    similar: bool
    size: str
    strategy: str
    frozen_stages: list[str]  # stage names, stem first
    trainable_stages: int  # stages after the stem that train (freeze.trainable_stages for freeze_most)
    peak: str  # the stage whose features the decision keeps
    reason: str
    stages: list[StageProbe]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        """The decision a ``to_dict()`` (freeze_plan.json's ``similarity``) holds."""
        fields = {k: d[k] for k in cls.__dataclass_fields__}
        return cls(**{**fields, "stages": [StageProbe(**s) for s in d["stages"]]})


def trainable_stages(setting: int | str, measured: Decision | None) -> int:
    """``freeze.trainable_stages`` as a number: as given; for ``auto`` the measured plan's when
    it trains the last stages (freeze_most), else DEFAULT_TRAINABLE_STAGES."""
    if setting != "auto":
        return int(setting)
    if measured is not None and measured.strategy == "freeze_most":
        return measured.trainable_stages
    return DEFAULT_TRAINABLE_STAGES


def decide(stages: Sequence[StageProbe], size: str, tolerance: float = SIMILARITY_TOLERANCE) -> Decision:
    """The strategy from a probe curve over ``stem, stage1..K`` (in order, no head).

    Features a network learnt on ImageNet grow more specific to ImageNet with depth
    (Yosinski et al., 2014). When the deepest stage separates the new classes as well as any
    earlier one (within ``tolerance`` or the deepest probe's own spread over the folds, if
    larger), the data is *similar*: its pretrained features fit, and the size class decides
    head_only or freeze_early. When the curve peaks earlier and falls by more than that, the
    later stages are too ImageNet-specific: the data is *different*. Then the stages that
    build the features this data needs, from the first one that separates the classes
    measurably better than the stem's generic edges up to the last, all adapt (freeze_most
    with the generic prefix frozen); the network trains whole (full) when no stage does
    better than the stem or the dataset is large. Freezing only up to the peak trains too
    little here: on scikit-learn's digits, fine-tuning the last stage alone fell below the
    probe (0.944), the last three reached 0.939 after an epoch, and all but the stem 0.958,
    then 0.983 after four more (head phase 0.950, EfficientNet-Lite0 at 64 px)."""
    if len(stages) < 2 or stages[0].name != "stem":
        raise ValueError("decide needs the probes of stem, stage1..K in order")
    k = len(stages) - 1
    top = max(s.acc_mean for s in stages)
    deepest = stages[-1]
    margin = max(tolerance, deepest.acc_std)
    names = [s.name for s in stages] + ["head"]
    similar = top - deepest.acc_mean <= margin
    best = max(range(k + 1), key=lambda i: (stages[i].acc_mean, i))
    if similar:
        peak, strategy, trainable = k, recommend(size, True), 0
    else:
        peak = best
        generic = next((i for i in range(1, k + 1) if stages[i].acc_mean > stages[0].acc_mean + margin), None)
        trainable = k if generic is None else k - generic + 1
        strategy = "freeze_most" if size == "small" and generic is not None else "full"
    frozen = frozen_names(names, strategy, None, trainable)
    trainable = sum(1 for n in names[1:-1] if n not in frozen)
    kept = stages[peak]
    if similar:
        reason = (f"the deepest stage {deepest.name} probes best ({deepest.acc_mean:.3f} +- {deepest.acc_std:.3f}; "
                  f"best {top:.3f}, margin {margin:.3f}): similar to ImageNet")
    else:
        first = next((n for n in names[1:-1] if n not in frozen), None)
        reason = (f"probe accuracy peaks at {kept.name} ({kept.acc_mean:.3f} +- {kept.acc_std:.3f}) and falls to "
                  f"{deepest.acc_mean:.3f} +- {deepest.acc_std:.3f} at {deepest.name} (more than the margin "
                  f"{margin:.3f}): different from ImageNet; "
                  + (f"the stages from {first} on adapt" if strategy == "freeze_most" and first else "all stages adapt"))
    return Decision(similar, size, strategy, sorted(frozen, key=names.index), trainable, kept.name,
                    f"{reason} -> {size} dataset: {strategy}", list(stages))
