"""Cell-level evaluation methods on frozen features: one function and one registry entry each.

A method takes one fold — training features and labels, test features, the number of classes, the probe config
and a dict for fold-level details — and returns ``{output name: predicted class per test row}``; one method may
give several outputs (kNN scores every k from one search). ``ProbeConfig.methods`` picks registry entries.
Adding a method: write the function, decorate it with ``@method("name")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

METHODS: dict[str, Callable] = {}
HEADLINE = "linear"  # the output whose balanced accuracy is a checkpoint's probe_score


def method(name: str):
    def register(fn: Callable) -> Callable:
        METHODS[name] = fn
        return fn

    return register


@method("linear")
def linear(x_tr, y_tr, x_te, n_classes: int, cfg, info: dict) -> dict[str, np.ndarray]:
    """Multinomial logistic regression (lbfgs) on standardised features; C by inner stratified 3-fold CV."""
    pred, c = linear_probe(x_tr, y_tr, x_te, cfg)
    info.setdefault("chosen_C", []).append(c)
    return {"linear": pred}


@method("knn")
def knn(x_tr, y_tr, x_te, n_classes: int, cfg, info: dict) -> dict[str, np.ndarray]:
    """Cosine kNN: uniform vote for each k in ``knn_k`` (DinoBloom) and exp(sim / T) weights at
    ``knn_weighted_k`` (DINOv2), all from one faiss search."""
    sims, nbrs = knn_search(x_tr, x_te, max([*cfg.knn_k, cfg.knn_weighted_k]))
    out = {f"knn{k}": knn_vote(sims, nbrs, y_tr, k, n_classes, None) for k in cfg.knn_k}
    out[f"knn{cfg.knn_weighted_k}_T{cfg.knn_temperature:g}"] = knn_vote(
        sims, nbrs, y_tr, cfg.knn_weighted_k, n_classes, cfg.knn_temperature)
    return out


# (threadpoolctl is a dependency of scikit-learn.) Below this many training feature values (rows x dims) a fit runs on one BLAS / OpenMP thread: on matrices
# this small (a demo's 300 x 64) the threads' start-up and spin-waiting cost more than they share, and on a busy
# 2-core machine the demo's final linear probe took 10-57 s per backbone with 2 threads against 1-3 s with one
# (benchmarks/RESULTS.md, "Debug preset: teacher temperature"). Large probes keep the libraries' threads.
SMALL_FIT_VALUES = 1 << 20


def fit_threads(x: np.ndarray):
    """One BLAS / OpenMP thread inside the block for a small fit (scoped: the previous limits come back)."""
    if x.size >= SMALL_FIT_VALUES:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def linear_probe(x_tr, y_tr, x_te, cfg) -> tuple[np.ndarray, float]:
    """Predictions on x_te and the C chosen by inner 3-fold CV."""
    with fit_threads(x_tr):
        return _linear_probe(x_tr, y_tr, x_te, cfg)


def _linear_probe(x_tr, y_tr, x_te, cfg) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=cfg.max_iter))
    inner = min(3, int(np.bincount(y_tr).min()))
    if inner >= 2 and len(cfg.c_grid) > 1:
        gs = GridSearchCV(pipe, {"logisticregression__C": list(cfg.c_grid)}, scoring="balanced_accuracy",
                          cv=StratifiedKFold(inner, shuffle=True, random_state=cfg.seed))
        gs.fit(x_tr, y_tr)
        return gs.predict(x_te), float(gs.best_params_["logisticregression__C"])
    pipe.set_params(logisticregression__C=cfg.c_grid[len(cfg.c_grid) // 2]).fit(x_tr, y_tr)
    return pipe.predict(x_te), float(cfg.c_grid[len(cfg.c_grid) // 2])


def knn_search(x_tr, x_te, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and indices of the k nearest training rows (faiss, exact inner product)."""
    import faiss

    index = faiss.IndexFlatIP(x_tr.shape[1])
    index.add(np.ascontiguousarray(x_tr, np.float32))
    return index.search(np.ascontiguousarray(x_te, np.float32), min(k, len(x_tr)))


def knn_vote(sims: np.ndarray, nbrs: np.ndarray, y_tr, k: int, n_classes: int,
             temperature: float | None) -> np.ndarray:
    """Vote over the first k neighbours (sorted by similarity): uniform (temperature None) or exp(sim / T)."""
    sims, nbrs = sims[:, :k], nbrs[:, :k]
    w = np.ones_like(sims) if temperature is None else np.exp((sims - sims.max(1, keepdims=True)) / temperature)
    votes = np.zeros((len(sims), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(sims)), nbrs.shape[1]), y_tr[nbrs].ravel()), w.ravel())
    return votes.argmax(1)


def knn_predict(x_tr, y_tr, x_te, k: int, n_classes: int, temperature: float | None) -> np.ndarray:
    """Cosine kNN vote with faiss: uniform (temperature None) or exp(sim / T) weights."""
    sims, nbrs = knn_search(x_tr, x_te, k)
    return knn_vote(sims, nbrs, y_tr, k, n_classes, temperature)
