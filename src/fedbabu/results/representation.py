"""Measures of a representation and of a classifier head, as pure functions of numpy arrays.

They answer the paper's question from the features themselves rather than from a head's accuracy:
is a body good without its classifier (nearest class mean, a linear probe), how does a head's
geometry differ between a trained and a fixed random one, how far does personalization move a
body (linear CKA), and how many directions do the features really use (effective rank).
Every function is deterministic; the probe is seeded.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

METRICS = ("euclidean", "cosine")
PROBE_C = 1.0
"""The probe's inverse L2 strength on standardized features: scikit-learn's default, fixed so runs compare."""
PROBE_MAX_ITER = 300


def nearest_mean_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                          test_labels: np.ndarray, metric: str = "euclidean") -> float:
    """Accuracy of assigning each test feature to the nearest class mean of the training features.

    This is accuracy without the classifier: only the classes present in the training split have
    a mean, so a test image of another class is always wrong. NaN without test images.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    if len(test_labels) == 0:
        return float("nan")
    if len(train_labels) == 0:
        return 0.0
    train = np.asarray(train_features, dtype=np.float64)
    test = np.asarray(test_features, dtype=np.float64)
    classes = np.unique(train_labels)
    means = np.stack([train[train_labels == c].mean(axis=0) for c in classes])
    if metric == "cosine":
        means = _unit_rows(means)
        scores = _unit_rows(test) @ means.T
    else:
        scores = -(np.square(test).sum(1, keepdims=True) - 2 * test @ means.T + np.square(means).sum(1))
    predicted = classes[scores.argmax(axis=1)]
    return float(np.mean(predicted == np.asarray(test_labels)))


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al., 2019) of two feature matrices of the same inputs (rows).

    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred matrices: 1 for the same
    representation up to an orthogonal transform and an isotropic scale, near 0 for unrelated ones.
    """
    if np.shape(x)[0] != np.shape(y)[0]:
        raise ValueError(f"linear_cka: {np.shape(x)[0]} and {np.shape(y)[0]} rows; both must describe the same "
                         "inputs")
    return float(cka_matrix([x, y])[0, 1])


def cka_matrix(features: list[np.ndarray]) -> np.ndarray:
    """Linear CKA between every pair of feature matrices of the same inputs (1 on the diagonal).

    Each matrix is centred and its ``||X^T X||_F`` computed once, so k matrices cost k self-products
    and k(k-1)/2 cross-products.
    """
    centred = [np.asarray(f, dtype=np.float64) - np.asarray(f, dtype=np.float64).mean(axis=0) for f in features]
    norms = [np.linalg.norm(c.T @ c) for c in centred]
    matrix = np.ones((len(centred), len(centred)))
    for i in range(len(centred)):
        for j in range(i + 1, len(centred)):
            denominator = norms[i] * norms[j]
            value = np.linalg.norm(centred[j].T @ centred[i]) ** 2 / denominator if denominator > 0 else np.nan
            matrix[i, j] = matrix[j, i] = value
    return matrix


def singular_values(features: np.ndarray) -> np.ndarray:
    """Singular values of the column-centred feature matrix, largest first."""
    centred = np.asarray(features, dtype=np.float64)
    centred = centred - centred.mean(axis=0)
    return np.linalg.svd(centred, compute_uv=False)


def effective_rank(values: np.ndarray) -> float:
    """exp of the entropy of the normalized singular values (Roy and Vetterli, 2007).

    d for d equal values (the identity), 1 for a single non-zero value (a rank-one matrix).
    """
    values = np.asarray(values, dtype=np.float64)
    total = values.sum()
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


RANK_TOLERANCE = 1e-6
"""Singular values below this fraction of the largest count as zero in :func:`numerical_rank`."""


def numerical_rank(values: np.ndarray, tolerance: float = RANK_TOLERANCE) -> int:
    """How many singular values exceed ``tolerance`` times the largest: the feature dimensions in use.

    A body whose ReLU channels died (always 0 on the probe images) loses a dimension per channel.
    """
    values = np.asarray(values, dtype=np.float64)
    return int((values > tolerance * values.max()).sum()) if values.size and values.max() > 0 else 0


def cosine_matrix(weight: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of a head's class rows (classes x classes)."""
    unit = _unit_rows(np.asarray(weight, dtype=np.float64))
    return unit @ unit.T


def head_geometry(weight: np.ndarray) -> dict[str, Any]:
    """How far a head is from a set of equal-norm, mutually orthogonal class vectors.

    ``norm_cv`` (std / mean of the row norms) and ``mean_abs_cosine`` (mean |cosine| between
    different classes) are 0 for an orthogonal equal-norm head; a head trained on skewed clients
    grows some classes' rows and aligns others. ``cosine`` is the :func:`cosine_matrix` the
    summaries come from, for callers that average or draw it.
    """
    norms = np.linalg.norm(np.asarray(weight, dtype=np.float64), axis=1)
    cosines = cosine_matrix(weight)
    off_diagonal = cosines[~np.eye(len(cosines), dtype=bool)]
    return {
        "norms": [float(v) for v in norms],
        "norm_cv": float(norms.std() / norms.mean()) if norms.mean() > 0 else 0.0,
        "mean_abs_cosine": float(np.abs(off_diagonal).mean()) if off_diagonal.size else 0.0,
        "max_cosine": float(off_diagonal.max()) if off_diagonal.size else 0.0,
        "cosine": cosines,
    }


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, seed: int = 0) -> dict[str, float | int | bool]:
    """A fresh multinomial logistic regression on standardized features: how linearly usable they are.

    The regularization and iteration budget are fixed (``PROBE_C``, ``PROBE_MAX_ITER``) so that
    bodies are compared under one probe; ``converged`` says whether lbfgs finished within it.
    """
    scaler = StandardScaler().fit(train_features)
    probe = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(scaler.transform(train_features), train_labels)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {
        "train_accuracy": float(probe.score(scaler.transform(train_features), train_labels)),
        "test_accuracy": float(probe.score(scaler.transform(test_features), test_labels)),
        "train_samples": len(train_labels),
        "test_samples": len(test_labels),
        "C": PROBE_C,
        "max_iter": PROBE_MAX_ITER,
        "converged": converged,
    }


def label_entropy(labels: np.ndarray, num_classes: int) -> float:
    """Entropy of a client's label distribution in bits: 0 for one class, log2(k) for k balanced ones."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    if counts.sum() == 0:
        return 0.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation, NaN where either side is constant or there are fewer than 3 points."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])
