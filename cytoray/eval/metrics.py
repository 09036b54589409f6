"""Classification metrics of one method's predictions, and the confusion matrix as a PNG."""

from __future__ import annotations

import numpy as np

from cytoray.errors import UserError


class ProbeError(UserError):
    """Labelled data a probe cannot score; the message names the manifest / column and the fix."""


def metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        recall_score,
    )

    labels = np.arange(len(classes))
    rec = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
            "per_class_recall": {c: float(r) for c, r in zip(classes, rec)},
            "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist()}


def confusion_png(result: dict, method: str = "linear") -> bytes:
    """Row-normalised confusion matrix of ``result['methods'][method]`` with the counts written in."""
    from cytoray.figures import figure, png_bytes

    cm = np.array(result["methods"][method]["confusion"], np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    classes = result["classes"]
    fig, ax = figure((1.0 + 0.45 * len(classes), 0.8 + 0.45 * len(classes)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{method}: balanced acc {result['methods'][method]['balanced_accuracy']:.3f}", fontsize=9)
    return png_bytes(fig, dpi=110)
