"""Patient-level subtyping from bags of frozen cell features: gated-attention MIL (ABMIL, Ilse et al. 2018),
as DinoBloom evaluates AML subtyping on AML Hehr.

A patient's cells (one feature row each) form a bag; the model scores every cell with a gated attention
``a_i ∝ exp(wᵀ(tanh(V h_i) ⊙ σ(U h_i)))``, pools ``Σ a_i h_i`` and classifies the patient. Cross-validation is
by patient (stratified k-fold over patients; a patient's cells never straddle train and test), or across sites
(``evaluate_mil_cross_site``: the patients of some sites train, each held-out site's patients test).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MILConfig:
    hidden: int = 128
    attention: int = 64
    dropout: float = 0.1
    epochs: int = 60
    lr: float = 2e-4
    weight_decay: float = 1e-4
    folds: int = 5
    seed: int = 0


def _model(dim: int, n_classes: int, cfg: MILConfig):
    import torch
    from torch import nn

    class GatedABMIL(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Sequential(nn.Linear(dim, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout))
            self.v = nn.Linear(cfg.hidden, cfg.attention)
            self.u = nn.Linear(cfg.hidden, cfg.attention)
            self.w = nn.Linear(cfg.attention, 1)
            self.head = nn.Linear(cfg.hidden, n_classes)

        def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.embed(bag)
            a = torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1), dim=0)
            return self.head(a @ h), a

    return GatedABMIL()


def train_and_predict(bags_tr, y_tr, bags_te, n_classes: int, cfg: MILConfig) -> np.ndarray:
    """Train on the training bags (init, dropout and order from ``cfg.seed``; the process RNG is left as it was)
    and predict the test bags."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _train_and_predict(bags_tr, y_tr, bags_te, n_classes, cfg)


def _train_and_predict(bags_tr, y_tr, bags_te, n_classes: int, cfg: MILConfig) -> np.ndarray:
    import torch

    model = _model(bags_tr[0].shape[1], n_classes, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    counts = np.bincount(y_tr, minlength=n_classes).astype(np.float32)
    weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / n_classes)  # class-balanced loss
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    rng = np.random.default_rng(cfg.seed)
    tr = [torch.from_numpy(b) for b in bags_tr]
    for _ in range(cfg.epochs):
        model.train()
        for i in rng.permutation(len(tr)):
            logits, _ = model(tr[i])
            loss = loss_fn(logits[None], torch.tensor([y_tr[i]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return np.array([int(model(torch.from_numpy(b))[0].argmax()) for b in bags_te])


def patient_bags(patient_ids: list, patient_labels: list) -> tuple[dict[str, list[int]], dict[str, str]]:
    """{patient: its rows}, {patient: its label}; rows without a patient or a label are left out."""
    bags: dict[str, list[int]] = {}
    label_of: dict[str, str] = {}
    for i, (p, lab) in enumerate(zip(patient_ids, patient_labels)):
        if p is None or lab is None or p != p or lab != lab:
            continue
        bags.setdefault(str(p), []).append(i)
        label_of[str(p)] = str(lab)
    return bags, label_of


def evaluate_mil(feats: np.ndarray, patient_ids: list, patient_labels: list, cfg: MILConfig) -> dict:
    """k-fold-by-patient ABMIL on cell features; returns accuracy, balanced accuracy, weighted F1, per class."""
    from sklearn.model_selection import StratifiedKFold

    from cytoray.eval.metrics import ProbeError, metrics

    bags, label_of = patient_bags(patient_ids, patient_labels)
    patients = sorted(bags)
    classes = sorted(set(label_of.values()))
    y = np.array([classes.index(label_of[p]) for p in patients])
    if len(classes) < 2 or len(patients) < 4:
        raise ProbeError(f"MIL needs >= 2 patient labels and >= 4 patients; found {len(patients)} patients, "
                         f"labels {classes}")
    folds = min(cfg.folds, int(np.bincount(y).min()))
    if folds < 2:
        raise ProbeError(f"MIL k-fold needs >= 2 patients per label; counts {dict(zip(classes, np.bincount(y)))}")
    x = [np.ascontiguousarray(feats[bags[p]], np.float32) for p in patients]
    yt, yp = [], []
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=cfg.seed).split(np.zeros(len(y)), y):
        pred = train_and_predict([x[i] for i in tr], y[tr], [x[i] for i in te], len(classes), cfg)
        yt.append(y[te])
        yp.append(pred)
    out = metrics(np.concatenate(yt), np.concatenate(yp), classes)
    out.update({"patients": len(patients), "cells": int(sum(len(b) for b in x)), "folds": folds, "classes": classes,
                "chance_balanced_accuracy": 1.0 / len(classes)})
    return out


def patient_sites(bags: dict[str, list[int]], sites: np.ndarray) -> dict[str, str]:
    """{patient: site} from its cells' sites; a patient whose cells name two sites is an error (a patient is
    seen at one site). Patients none of whose cells has a site are left out."""
    from cytoray.eval.metrics import ProbeError

    out = {}
    for p, rows in bags.items():
        named = sorted({s for s in sites[rows].tolist() if s is not None})
        if len(named) > 1:
            raise ProbeError(f"patient {p!r} has cells from sites {named}; cross-site ABMIL needs each patient "
                             "at one site (fix the manifest's site or patient_id column)")
        if named:
            out[p] = named[0]
    return out


def evaluate_mil_cross_site(feats: np.ndarray, patient_ids: list, patient_labels: list, sites: np.ndarray,
                            cross_site, cfg: MILConfig, where: str = "the manifest") -> dict:
    """ABMIL trained on the patients of some sites, scored on each held-out site's patients (whole patients:
    a bag never straddles train and test). ``sites`` (N,) each cell's site or None; ``cross_site`` a
    ``protocols.CrossSiteConfig``. Per held-out site metrics and their unweighted mean."""
    from cytoray.eval.metrics import ProbeError, metrics
    from cytoray.eval.protocols import site_folds

    bags, label_of = patient_bags(patient_ids, patient_labels)
    site_of = patient_sites(bags, sites)
    patients = sorted(site_of)
    classes = sorted({label_of[p] for p in patients})
    if len(classes) < 2:
        raise ProbeError(f"cross-site MIL needs >= 2 patient labels; found {classes}")
    y = np.array([classes.index(label_of[p]) for p in patients])
    psite = np.array([site_of[p] for p in patients], dtype=object)
    x = [np.ascontiguousarray(feats[bags[p]], np.float32) for p in patients]
    folds = site_folds(psite, cross_site, where)
    per_site, split = {}, []
    for train, test in folds:
        tr = np.flatnonzero(np.isin(psite, train))
        present = np.unique(y[tr])
        if len(present) < 2:
            raise ProbeError(f"cross-site MIL fold training on {train}: fewer than 2 patient labels there "
                             f"({[classes[i] for i in present]})")
        te = np.flatnonzero(np.isin(psite, test))
        pred = present[train_and_predict([x[i] for i in tr], np.searchsorted(present, y[tr]),
                                         [x[i] for i in te], len(present), cfg)]
        split.append({"train": train, "test": test, "train_patients": int(len(tr)),
                      "test_patients": int(len(te))})
        for site in test:
            mask = psite[te] == site
            per_site[site] = metrics(y[te][mask], pred[mask], classes)
            per_site[site]["patients"] = int(mask.sum())
    mean = {k: float(np.mean([m[k] for m in per_site.values()]))
            for k in ("accuracy", "balanced_accuracy", "weighted_f1")}
    return {"protocol": cross_site.protocol, "site_column": cross_site.site_column, "folds": split,
            "patients": len(patients), "classes": classes, "mean": mean, "per_site": per_site}
