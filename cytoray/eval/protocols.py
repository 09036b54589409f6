"""Probing across sites: train on some datasets (sites), test on the others, per held-out site and their mean;
and how strongly the features encode the site at all (the Robustness Index), from the features alone.

What users of a hematology backbone ask is whether it holds at another hospital, scanner and staining protocol.
An in-site probe (``probe.protocol``: stratified k-fold or the manifest's split, every site on both sides) rewards
features that keep stain and scanner information; a cross-site probe, as DinoBloom and the pathology foundation
models report, does not. ``probe.cross_site`` adds one of two protocols beside the in-site one, which stays as it
is:

- ``leave_one_dataset_out``: one fold per site; train on every other site, test on it;
- ``explicit``: train on ``train_datasets``, test on ``test_datasets`` (default: every other site), each held-out
  site scored on its own.

A row's site is its ``probe.cross_site.site_column`` value (default ``dataset``); rows without one take no part.
Cell-level methods (linear, kNN) split rows; ABMIL splits patients (``cytoray.eval.mil``), each patient at one site.

Robustness Index (de Jong, Marcus, Teuwen 2025, arXiv 2501.18055): for every labelled image, its ``k`` nearest
neighbours (cosine) among the other images are counted as SO (same class, other site) or OS (other class, same
site); ``RI = sum SO / sum OS`` pooled over all images. RI > 1: neighbourhoods are organised more by biology than
by site; RI < 1: more by site. ``biology_share = sum SO / (sum SO + sum OS)`` in [0, 1] (PathoROB's normalised
form, 0.5 neutral) is the figure the tables lead with: it is bounded and defined whenever any neighbour is SO or OS.
A ratio without a denominator is None (``null`` in JSON, left out of Ray metrics), never ``inf`` or NaN, so every
results file stays valid JSON: RI is None when no neighbour is OS, biology_share when none is SO or OS.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import numpy as np

from cytoray.eval.methods import METHODS, knn_search
from cytoray.eval.metrics import ProbeError, metrics

CROSS_SITE_PROTOCOLS = ("none", "leave_one_dataset_out", "explicit")
HEADLINES = ("in_site", "cross_site")  # what probe_score is: the in-site or the cross-site mean linear probe


@dataclass
class CrossSiteConfig:
    """Probing across sites (``probe.cross_site.*``); ``protocol=none`` leaves the probe in-site only."""

    protocol: str = "none"  # none | leave_one_dataset_out | explicit
    site_column: str = "dataset"  # the manifest column naming each row's site (dataset, hospital, scanner)
    train_datasets: list[str] = field(default_factory=list)  # explicit: the training sites
    test_datasets: list[str] = field(default_factory=list)  # explicit: the held-out sites; []: every other site
    robustness_k: int = 20  # neighbours per image for the Robustness Index (manifests with >= 2 sites); 0: off


def _choose(key: str, value: str, choices) -> ProbeError:
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ProbeError(f"{key}={value!r}: choose {', '.join(choices)}{hint}")


def check_settings(cfg: CrossSiteConfig, headline: str) -> None:
    """Settings that need no manifest; ``probe.``-prefixed messages (``eval.`` is added for training runs)."""
    if cfg.protocol not in CROSS_SITE_PROTOCOLS:
        raise _choose("probe.cross_site.protocol", cfg.protocol, CROSS_SITE_PROTOCOLS)
    if headline not in HEADLINES:
        raise _choose("probe.headline", headline, HEADLINES)
    if headline == "cross_site" and cfg.protocol == "none":
        raise ProbeError("probe.headline=cross_site needs a cross-site protocol: set probe.cross_site.protocol="
                         "leave_one_dataset_out (or explicit with probe.cross_site.train_datasets=[...])")
    if cfg.protocol == "explicit" and not cfg.train_datasets:
        raise ProbeError("probe.cross_site.protocol=explicit needs probe.cross_site.train_datasets=[<site>, ...]")
    if cfg.protocol != "explicit" and (cfg.train_datasets or cfg.test_datasets):
        raise ProbeError(f"probe.cross_site.train_datasets / test_datasets are read only with protocol=explicit "
                         f"(protocol is {cfg.protocol!r}); set probe.cross_site.protocol=explicit")
    both = sorted(set(cfg.train_datasets) & set(cfg.test_datasets))
    if both:
        raise ProbeError(f"probe.cross_site: sites {both} are in both train_datasets and test_datasets")
    if cfg.robustness_k < 0:
        raise ProbeError(f"probe.cross_site.robustness_k={cfg.robustness_k} must be >= 0 (0: off)")


def site_values(column: list) -> np.ndarray:
    """Site names as an object array of str, None where a row has none."""
    return np.array([None if (v is None or v != v) else str(v) for v in column], dtype=object)


def site_folds(sites: np.ndarray, cfg: CrossSiteConfig, where: str = "the manifest") -> list[tuple[list, list]]:
    """[(training sites, held-out sites), ...]: one fold per site (leave_one_dataset_out) or one fold (explicit).

    ``sites``: each row's site (None: no site). No site is ever on both sides of a fold."""
    present = sorted({s for s in sites.tolist() if s is not None})
    col = cfg.site_column
    if cfg.protocol == "leave_one_dataset_out":
        if len(present) < 2:
            raise ProbeError(f"probe.cross_site.protocol=leave_one_dataset_out needs >= 2 sites in column {col!r} "
                             f"of {where}; found {present}")
        return [([s for s in present if s != held], [held]) for held in present]
    if cfg.protocol != "explicit":
        raise ProbeError(f"probe.cross_site.protocol={cfg.protocol!r} has no folds")
    missing = [s for s in [*cfg.train_datasets, *cfg.test_datasets] if s not in present]
    if missing:
        raise ProbeError(f"probe.cross_site: sites {missing} are not in column {col!r} of {where}; "
                         f"sites present: {present}")
    test = list(cfg.test_datasets) or [s for s in present if s not in cfg.train_datasets]
    if not test:
        raise ProbeError(f"probe.cross_site.train_datasets={list(cfg.train_datasets)} leaves no site of {where} to "
                         f"test on; sites present: {present}")
    return [(list(cfg.train_datasets), test)]


def cross_site_scores(x: np.ndarray, y: np.ndarray, sites: np.ndarray, classes: list[str], cfg, info: dict,
                      where: str = "the manifest") -> dict:
    """Every ``cfg.methods`` entry trained on each fold's sites and scored on each held-out site.

    ``x`` (N, D) features, ``y`` (N,) class index into ``classes``, ``sites`` (N,) site or None; ``cfg`` a
    ProbeConfig. Returns the protocol, folds, images per site and, per method output, the metrics of every
    held-out site and their unweighted mean (each site counts once, whatever its size)."""
    cs = cfg.cross_site
    folds = site_folds(sites, cs, where)
    preds: dict[str, dict[str, np.ndarray]] = {}  # output -> held-out site -> predictions
    truth: dict[str, np.ndarray] = {}
    unseen: dict[str, list[str]] = {}
    for train, test in folds:
        tr = np.flatnonzero(np.isin(sites, train))
        present = np.unique(y[tr])  # the classes the training sites show; methods see them as 0..n-1
        if len(present) < 2:
            raise ProbeError(f"cross-site fold training on {train}: fewer than 2 classes there "
                             f"({[classes[i] for i in present]}); add sites or classes")
        y_tr = np.searchsorted(present, y[tr])
        te = np.flatnonzero(np.isin(sites, test))
        for name in cfg.methods:
            for output, pred in METHODS[name](x[tr], y_tr, x[te], len(present), cfg, info).items():
                for site in test:
                    mask = sites[te] == site
                    preds.setdefault(output, {})[site] = present[pred[mask]]
        for site in test:
            truth[site] = y[te][sites[te] == site]
            missing = sorted({classes[i] for i in truth[site].tolist()} - {classes[i] for i in present})
            if missing:
                unseen[site] = missing
    held_out = [s for _, test in folds for s in test]
    out = {"protocol": cs.protocol, "site_column": cs.site_column,
           "folds": [{"train": train, "test": test} for train, test in folds],
           "images": {s: int(len(truth[s])) for s in held_out}, "methods": {}}
    if unseen:
        out["classes_not_in_training"] = unseen  # recall 0 for these: no training site shows them
    for output, per in preds.items():
        per_site = {s: metrics(truth[s], per[s], classes) for s in held_out}
        mean = {k: float(np.mean([m[k] for m in per_site.values()]))
                for k in ("accuracy", "balanced_accuracy", "weighted_f1")}
        out["methods"][output] = {"mean": mean, "per_site": per_site}
    return out


def robustness_index(x: np.ndarray, y: np.ndarray, sites: np.ndarray, k: int) -> dict:
    """Robustness Index of features ``x`` (N, D) for classes ``y`` (N,) and sites ``sites`` (N,), pooled over the
    ``k`` nearest neighbours (cosine; the image itself excluded) of every image. See the module docstring."""
    x = np.ascontiguousarray(x, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(k, len(x) - 1)
    _, nbrs = knn_search(x, x, k + 1)
    own = nbrs == np.arange(len(x))[:, None]
    keep = np.where(own.any(1, keepdims=True), ~own, np.arange(nbrs.shape[1])[None] < k)  # drop self (or the last)
    nbrs = nbrs[keep].reshape(len(x), k)
    same_class = y[nbrs] == y[:, None]
    same_site = sites[nbrs] == sites[:, None]
    so = int((same_class & ~same_site).sum())
    os_ = int((~same_class & same_site).sum())
    return {"k": int(k), "robustness_index": so / os_ if os_ else None,  # None: no OS neighbour (see above)
            "biology_share": so / (so + os_) if so + os_ else None,
            "same_class_other_site": so, "other_class_same_site": os_,
            "same_class_same_site": int((same_class & same_site).sum()),
            "other_class_other_site": int((~same_class & ~same_site).sum()),
            "images": int(len(x)), "sites": int(len(set(sites.tolist())))}
