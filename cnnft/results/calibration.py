"""Calibrated probabilities: temperature scaling (Guo et al. 2017) and how well probabilities
match accuracy (expected calibration error, negative log-likelihood, a reliability table).

A fine-tuned network's softmax is usually over-confident. Dividing its logits by one scalar
``T > 1`` (fitted on held-out logits by minimising their NLL) softens it without changing any
prediction: logits keep their order. Everything here works on numpy arrays; the fit imports
torch for its L-BFGS only.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15  # equal-width bins on the top-label confidence, as Guo et al. report ECE
TINY = 1e-300  # log(0) guard when logits are recovered from probabilities
T_RANGE = (1e-2, 1e2)  # a fitted temperature outside this is a sign of broken logits, clipped


def logits_from_probs(probs: np.ndarray) -> np.ndarray:
    """Logits up to a per-row constant, which softmax (at any temperature) ignores: log p."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), TINY, None))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return float("nan")
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, TINY, None)).mean())


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width bin of top-label confidence: its range, image count, mean confidence and
    accuracy (None for an empty bin)."""
    p = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    conf = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == labels) if len(p) else np.zeros(0, dtype=bool)
    # bin b holds (b/bins, (b+1)/bins]; a confidence of exactly 0 cannot occur for a softmax
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        out.append({"low": b / bins, "high": (b + 1) / bins, "count": n,
                    "confidence": float(conf[m].mean()) if n else None,
                    "accuracy": float(correct[m].mean()) if n else None})
    return out


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over
    equal-width bins of the top-label confidence."""
    table = reliability(probs, labels, bins)
    total = sum(r["count"] for r in table)
    if total == 0:
        return float("nan")
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in table if r["count"]) / total)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` on held-out (logits,
    labels): one scalar, fitted as log T by L-BFGS (so T stays positive). 1.0 when there is
    nothing to fit on."""
    import torch

    labels = np.asarray(labels, dtype=np.int64)
    z = np.asarray(logits, dtype=np.float64)
    if len(labels) == 0 or z.ndim != 2 or z.shape[1] < 2 or not np.isfinite(z).all():
        return 1.0
    x = torch.from_numpy(z - z.max(axis=1, keepdims=True))
    y = torch.from_numpy(labels)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return float(min(max(t, T_RANGE[0]), T_RANGE[1]))


def summary(probs: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """ECE and NLL of raw probabilities (``*_before``) and at ``temperature`` (``*_after``),
    with the accuracy of both (identical: a temperature never changes the top class)."""
    labels = np.asarray(labels, dtype=np.int64)
    raw = np.asarray(probs, dtype=np.float64)
    cal = softmax(logits_from_probs(raw), temperature)
    acc = (lambda p: float((p.argmax(1) == labels).mean()) if len(labels) else float("nan"))
    return {"temperature": round(float(temperature), 6), "images": int(len(labels)), "bins": ECE_BINS,
            "ece_before": _r(ece(raw, labels)), "ece_after": _r(ece(cal, labels)),
            "nll_before": _r(nll(raw, labels)), "nll_after": _r(nll(cal, labels)),
            "accuracy_before": _r(acc(raw)), "accuracy_after": _r(acc(cal))}


def _r(v: float) -> float | None:
    return None if not math.isfinite(v) else round(v, 6)


def checked_temperature(value, where: str) -> float:
    """A stored temperature read back: a finite positive number, else ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: temperature must be a finite number > 0, got {value!r}")
    return float(value)
