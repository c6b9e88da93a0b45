"""What ``cnnft check`` finds in a data set, from numbers already computed: near-duplicate pairs
(cosine similarity of backbone features), likely label errors (confident learning on
out-of-fold probabilities) and class balance. Pure numpy: no model, no files."""

from __future__ import annotations

import numpy as np

# Cosine similarity of L2-normalised pooled features at or above which two images are called
# near-duplicates. Measured by benchmarks/check.py on copies made from real images (resized,
# re-encoded as JPEG, cropped by a few percent, brightness-shifted) against distinct images of the
# other images (ants/bees photos at 64 px, efficientnet_lite0: every planted copy at 0.90 and no
# other pair; see the README, which also says where it fails: 8x8 digits all look alike to it).
NEAR_DUPLICATE_THRESHOLD = 0.90
PAIRS_LISTED = 1000  # near-duplicate pairs kept in check.json (all are counted)


def normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def similar_pairs(x: np.ndarray, threshold: float, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with cosine similarity >= ``threshold`` between rows of ``x``, most similar
    first, as three arrays (i, j, similarity): a set whose images all look alike to the backbone
    has millions of pairs, which arrays hold in a few bytes each."""
    z = normalised(x)
    ii, jj, ss = [], [], []
    for a in range(0, len(z), chunk):
        s = z[a:a + chunk] @ z[a:].T  # the upper triangle only: columns from ``a`` on
        r, c = np.nonzero(s >= threshold)
        keep = r < c
        r, c = r[keep], c[keep]
        ii.append((a + r).astype(np.int32))
        jj.append((a + c).astype(np.int32))
        ss.append(s[r, c].astype(np.float32))
    if not ii:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
    i, j, sim = np.concatenate(ii), np.concatenate(jj), np.concatenate(ss)
    order = np.argsort(-sim, kind="stable")
    return i[order], j[order], sim[order]


def confident_learning(probs: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Likely label errors by confident learning (Northcutt et al. 2021): class j's threshold is
    the mean predicted probability of j over the images labelled j; an image whose probability
    for some other class reaches that class's threshold (the most probable such class when
    several do) is counted as belonging there. Each suspect: index, given and suggested label
    index, self-confidence (probability of the given label) and score (1 - self-confidence);
    most suspicious (lowest self-confidence) first."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return []
    k = p.shape[1]
    thresholds = np.array([p[y == j, j].mean() if (y == j).any() else 1.0 for j in range(k)])
    above = p >= thresholds[None, :] - 1e-12
    masked = np.where(above, p, -1.0)
    counted = masked.argmax(1)
    has = above.any(1)
    self_conf = p[np.arange(len(y)), y]
    out = []
    for i in np.nonzero(has & (counted != y))[0]:
        out.append({"index": int(i), "given": int(y[i]), "suggested": int(counted[i]),
                    "self_confidence": round(float(self_conf[i]), 6), "score": round(float(1 - self_conf[i]), 6)})
    return sorted(out, key=lambda r: (r["self_confidence"], r["index"]))


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold number (0..k-1) per image, each class dealt round-robin over the folds in a random order."""
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        fold[idx] = (np.arange(len(idx)) + rng.integers(k)) % k
    return fold


def balance(counts: dict[str, int]) -> dict:
    """Per-class counts, the largest/smallest ratio and the classes under a fifth of the largest."""
    if not counts:
        return {"counts": {}, "ratio": None, "small_classes": []}
    big, small = max(counts.values()), min(counts.values())
    return {"counts": dict(counts), "ratio": None if small == 0 else round(big / small, 3),
            "small_classes": sorted(c for c, n in counts.items() if n < big / 5)}
