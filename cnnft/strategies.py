"""The four fine-tuning strategies and how one is chosen: dataset size x similarity to
ImageNet. Plain data, no torch: the config schema and the fast commands read it."""

from __future__ import annotations

from .errors import ConfigError

STRATEGIES = ("full", "freeze_early", "freeze_most", "head_only")

# average images per class at or above which a dataset counts as "large"
LARGE_IMAGES_PER_CLASS = 1000

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


BATCHNORM = ("auto", "train", "eval")


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
