"""RudolfV-style rebalancing: groups (from metadata or an expert's mapping file, with weights) on top of the
hierarchical k-means tree, balanced top-down sampling to a target size, and balance metrics.

Sampling tree: root -> group -> coarsest cluster -> ... -> finest cluster -> images. A node's budget is
split over its children by a *cap search* (Vo et al. 2024's balanced hierarchical sampling, with
RudolfV's weights): find the cap ``c`` with ``Σ_i min(w_i · c, capacity_i) = budget``, where
``capacity_i = size_i × max_repeat`` — small children get everything they have (repeated up to
``max_repeat`` times), large ones are cut to the common cap. Integer budgets use largest-remainder rounding
(ties by child order), and a leaf draws its budget from its images without replacement first, then whole
repeats, then a seeded random remainder: the result is deterministic for a seed.

Output per kept image: ``group``, ``weight`` (the group weight), ``repeats`` (times it appears per epoch;
0 = not sampled). The balanced manifest is the rows with ``repeats >= 1``; the unbalanced one keeps every
deduplicated row with its cluster ids, for comparison.

Mapping file (CSV, the report writes a template): ``cluster,group,weight`` per coarsest-level cluster. A
weight of 0 drops the cluster (e.g. one an expert names "artefacts"); clusters missing from the file are
an error (never silently dropped), as are unknown columns or negative weights.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import numpy as np

from cytoray.errors import UserError

log = logging.getLogger(__name__)

GROUP_COLUMNS = ("dataset", "modality", "cell_type", "patient_label")


@dataclass
class BalanceConfig:
    enabled: bool = True
    target_size: int | None = None  # sampled rows per epoch (incl. repeats); default: the kept image count
    group_by: str = "dataset"  # dataset | modality | cell_type | patient_label | none
    group_weights: dict[str, float] = field(default_factory=dict)  # per group (missing: 1.0)
    mapping_file: str | None = None  # CSV cluster,group,weight over the coarsest clusters; replaces group_by
    max_repeat: int = 4  # most times one image may be repeated per epoch
    mixing_k: int = 10  # neighbours for the kNN dataset-mixing score
    mixing_sample: int = 5000  # images the mixing score is computed on (subsampled above)
    seed: int = 0


class BalanceError(UserError):
    pass


def cap_allocation(sizes: np.ndarray, weights: np.ndarray, budget: int, max_repeat: int) -> np.ndarray:
    """Integer budget per child: Σ = min(budget, Σ capacity), each ≤ capacity = size·max_repeat and, among
    children not at capacity, proportional to weight at a common cap (found by bisection)."""
    sizes = np.asarray(sizes, np.int64)
    weights = np.asarray(weights, np.float64)
    cap = sizes * max_repeat * (weights > 0)
    budget = int(min(budget, cap.sum()))
    if budget <= 0:
        return np.zeros(len(sizes), np.int64)
    lo, hi = 0.0, float(cap.max() / weights[weights > 0].min()) + 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if np.minimum(weights * mid, cap).sum() < budget:
            lo = mid
        else:
            hi = mid
    exact = np.minimum(weights * hi, cap)
    alloc = np.minimum(np.floor(exact).astype(np.int64), cap)
    short = budget - int(alloc.sum())
    if short > 0:
        frac = np.where(alloc < cap, exact - alloc, -1.0)
        for i in np.argsort(-frac, kind="stable"):
            if short == 0:
                break
            if alloc[i] < cap[i]:
                alloc[i] += 1
                short -= 1
    elif short < 0:  # floating point overshoot: trim the largest
        for i in np.argsort(-alloc, kind="stable")[:-short]:
            alloc[i] -= 1
    return alloc


def _leaf_repeats(n_images: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    reps = np.full(n_images, budget // n_images, np.int64)
    extra = budget - int(reps.sum())
    if extra:
        reps[rng.choice(n_images, extra, replace=False)] += 1
    return reps


def hierarchical_sample(keys: list[np.ndarray], node_weight: np.ndarray, target: int, max_repeat: int,
                        seed: int) -> np.ndarray:
    """Repeats per image. ``keys``: one int array per tree level, top first (group, coarse ... fine cluster);
    ``node_weight``: weight of each image's top-level node (children below weigh 1)."""
    n = len(keys[0]) if keys else 0
    repeats = np.zeros(n, np.int64)
    rng = np.random.default_rng(seed)

    def visit(idx: np.ndarray, depth: int, budget: int) -> None:
        if budget <= 0 or len(idx) == 0:
            return
        if depth == len(keys):
            repeats[idx] = _leaf_repeats(len(idx), budget, rng)
            return
        k = keys[depth][idx]
        order = np.argsort(k, kind="stable")
        uniq, starts, counts = np.unique(k[order], return_index=True, return_counts=True)
        w = node_weight[idx[order[starts]]] if depth == 0 else np.ones(len(uniq))
        alloc = cap_allocation(counts, w, budget, max_repeat)
        for s, c, a in zip(starts, counts, alloc):
            visit(idx[order[s:s + c]], depth + 1, int(a))

    visit(np.arange(n), 0, target)
    return repeats


def read_mapping(uri: str, storage_cfg=None) -> dict[int, tuple[str, float]]:
    """cluster -> (group, weight) from the expert's CSV (columns cluster,group,weight)."""
    import csv

    from cytoray import storage

    text = storage.read_bytes(uri, storage_cfg).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    need = {"cluster", "group", "weight"}
    if not reader.fieldnames or not need <= set(reader.fieldnames):
        raise BalanceError(f"balance.mapping_file {uri}: columns must include cluster,group,weight "
                           f"(found {reader.fieldnames}); start from the template the report writes")
    out = {}
    for line, row in enumerate(reader, start=2):
        try:
            c, w = int(row["cluster"]), float(row["weight"])
        except ValueError as exc:
            raise BalanceError(f"balance.mapping_file {uri} line {line}: {exc}") from None
        if w < 0 or not np.isfinite(w):
            raise BalanceError(f"balance.mapping_file {uri} line {line}: weight {w} must be finite and >= 0")
        if not row["group"].strip():
            raise BalanceError(f"balance.mapping_file {uri} line {line}: empty group name")
        out[c] = (row["group"].strip(), w)
    return out


def assign_groups(frame, top_clusters: np.ndarray, cfg: BalanceConfig, storage_cfg=None):
    """(group name per image, weight per image) from the mapping file or the ``group_by`` column."""
    n = len(frame)
    if cfg.mapping_file:
        mapping = read_mapping(cfg.mapping_file, storage_cfg)
        missing = sorted(set(np.unique(top_clusters).tolist()) - set(mapping))
        if missing:
            raise BalanceError(f"balance.mapping_file {cfg.mapping_file} has no row for clusters {missing[:20]}; "
                               "give every cluster a group and weight (weight 0 drops it)")
        groups = np.array([mapping[c][0] for c in top_clusters.tolist()], dtype=object)
        weights = np.array([mapping[c][1] for c in top_clusters.tolist()], np.float64)
        return groups, weights
    if cfg.group_by == "none":
        groups = np.array(["all"] * n, dtype=object)
    elif cfg.group_by in GROUP_COLUMNS:
        groups = np.array([("unlabelled" if v is None or v != v else str(v)) for v in frame[cfg.group_by]],
                          dtype=object)
    else:
        raise BalanceError(f"balance.group_by={cfg.group_by!r}: choose one of {list(GROUP_COLUMNS) + ['none']}")
    unknown = sorted(set(cfg.group_weights) - set(groups.tolist()))
    if unknown:
        raise BalanceError(f"balance.group_weights names groups {unknown} that are not values of "
                           f"{cfg.group_by!r} (present: {sorted(set(groups.tolist()))[:20]})")
    weights = np.array([float(cfg.group_weights.get(g, 1.0)) for g in groups.tolist()], np.float64)
    if (weights < 0).any():
        raise BalanceError("balance.group_weights must be >= 0")
    return groups, weights


# ---------------------------------------------------------------------------------------------- metrics


def _dist(values, weights=None) -> dict:
    vals, inv = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    w = np.bincount(inv, weights=weights, minlength=len(vals)).astype(np.float64)
    return dict(zip(vals.tolist(), w.tolist()))


def distribution_stats(values, weights=None) -> dict:
    """Normalised entropy (1 = uniform over the categories present before balancing) and KL to uniform."""
    counts = np.array([c for c in _dist(values, weights).values() if c > 0], np.float64)
    p = counts / counts.sum()
    h = float(-(p * np.log(p)).sum())
    k = len(p)
    return {"categories": k, "entropy": round(h, 4), "normalized_entropy": round(h / np.log(k), 4) if k > 1 else 1.0,
            "kl_to_uniform": round(float(np.log(k) - h), 4), "largest_share": round(float(p.max()), 4)}


def knn_mixing(emb: np.ndarray, datasets: np.ndarray, weights: np.ndarray, k: int, sample: int, seed: int) -> float:
    """Batch-effect score: mean share of an image's k nearest neighbours (cosine, among the images with
    weight > 0) that come from another dataset, divided by the share expected if datasets were perfectly
    mixed (1 - Σ p_d²). 1 = no dataset signature in the embedding; near 0 = datasets form separate islands.
    Queries are drawn ∝ weight (repeats), so the score describes what training sees."""
    import faiss

    keep = np.flatnonzero(weights > 0)
    if len(keep) <= k or len(set(datasets[keep].tolist())) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    if len(keep) > sample:
        keep = np.sort(rng.choice(keep, sample, replace=False, p=weights[keep] / weights[keep].sum()))
    x = np.ascontiguousarray(emb[keep], dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, nbrs = index.search(x, k + 1)
    d = datasets[keep]
    w = weights[keep].astype(np.float64)
    other = (d[nbrs[:, 1:]] != d[:, None]).mean(1)
    p = np.array(list(_dist(d, w).values()))
    p = p / p.sum()
    expected = 1.0 - float((p ** 2).sum())
    return round(float((other * w).sum() / w.sum()) / expected, 4)


def balance_metrics(frame, emb: np.ndarray, repeats: np.ndarray | None, top_cluster: np.ndarray, groups,
                    cfg: BalanceConfig) -> dict:
    """Distribution stats over datasets, groups, cell types and top-level clusters, largest dataset share
    and kNN dataset mixing; ``repeats=None`` = before balancing (every kept image once)."""
    w = np.ones(len(frame)) if repeats is None else repeats.astype(np.float64)
    ds = frame["dataset"].to_numpy(dtype=object)
    return {
        "images": int((w > 0).sum()), "samples_per_epoch": int(w.sum()),
        "dataset": distribution_stats(ds, w), "group": distribution_stats(groups, w),
        "cell_type": distribution_stats(frame["cell_type"].fillna("unlabelled").to_numpy(dtype=object), w),
        "cluster": distribution_stats(top_cluster, w),
        "largest_dataset_share": distribution_stats(ds, w)["largest_share"],
        "knn_dataset_mixing": knn_mixing(emb, ds, w, cfg.mixing_k, cfg.mixing_sample, cfg.seed),
        "counts": {"dataset": _dist(ds, w), "group": _dist(groups, w),
                   "cell_type": _dist(frame["cell_type"].fillna("unlabelled").to_numpy(dtype=object), w),
                   "cluster": _dist(top_cluster, w)},
    }


def mapping_template(frame, top: np.ndarray, column: str) -> str:
    """CSV an expert edits into ``balance.mapping_file``: one row per coarsest cluster with its size and
    what it holds; group defaults to the cluster's own name, weight to 1."""
    import csv

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["cluster", "group", "weight", "images", "top_datasets", "top_cell_types"])
    for c in np.unique(top).tolist():
        sel = frame[top == c]
        ds = sel["dataset"].value_counts().head(3)
        ct = sel["cell_type"].fillna("unlabelled").value_counts().head(3)
        w.writerow([c, f"{column}_{c}", 1.0, len(sel), "; ".join(f"{k} {v}" for k, v in ds.items()),
                    "; ".join(f"{k} {v}" for k, v in ct.items())])
    return buf.getvalue()


def run_balance(out_uri: str, cfg: BalanceConfig, storage_cfg=None, force: bool = False,
                embeddings: str | None = None,
                scale=None) -> dict:
    """Balance stage: ``deduplicated.parquet`` + ``clusters.parquet`` -> ``unbalanced.parquet`` (every kept
    image with cluster ids, group, weight, repeats) and ``balanced.parquet`` (rows with repeats >= 1), the
    mapping template ``group_mapping_template.csv`` and before/after balance metrics."""
    from cytoray.curation.stage import run_stage

    settings = {"balance": cfg, "embeddings": embeddings}
    return run_stage("balance", out_uri, settings, lambda run: _balance(run, cfg, embeddings, storage_cfg),
                     storage_cfg, force)


def _balance(run, cfg: BalanceConfig, embeddings: str | None, storage_cfg) -> dict:
    import pyarrow as pa

    from cytoray.curation.cluster import load_stage_embeddings
    from cytoray.manifest import cluster_columns

    table, clusters = run.read("deduplicated.parquet"), run.read("clusters.parquet")
    if clusters.column("image_id").to_pylist() != table.column("image_id").to_pylist():
        raise AssertionError("clusters.parquet rows do not match deduplicated.parquet; rerun the cluster stage "
                             "(force=true)")
    cluster_cols = cluster_columns(clusters.column_names)
    for c in cluster_cols:
        table = table.append_column(c, clusters.column(c))
    frame = table.select(["image_id", "dataset", "modality", "cell_type", "patient_label"]).to_pandas()
    labels = np.stack([clusters.column(c).to_numpy() for c in cluster_cols], 1).astype(np.int64)
    top = labels[:, -1]
    groups, weights = assign_groups(frame, top, cfg, storage_cfg)
    target = int(cfg.target_size if cfg.target_size is not None else len(frame))
    if target < 0:
        raise BalanceError(f"balance.target_size={target} must be >= 0")
    _, group_codes = np.unique(groups.astype(str), return_inverse=True)
    keys = [group_codes] + [labels[:, t] for t in range(labels.shape[1] - 1, -1, -1)]
    repeats = hierarchical_sample(keys, weights, target, cfg.max_repeat, cfg.seed)
    sampled = int(repeats.sum())
    if sampled < target:
        log.warning("balance: only %d of target %d samples possible (max_repeat=%d, zero-weight groups); "
                    "raise balance.max_repeat for more", sampled, target, cfg.max_repeat)
    table = (table.append_column("group", pa.array(groups.astype(str).tolist(), pa.string()))
             .append_column("weight", pa.array(weights, pa.float32()))
             .append_column("repeats", pa.array(repeats, pa.int32())))
    run.publish("unbalanced.parquet", table)
    run.publish("balanced.parquet", table.filter(pa.array(repeats > 0)))
    run.publish_bytes("group_mapping_template.csv", mapping_template(frame, top, cluster_cols[-1]).encode())
    emb = load_stage_embeddings(run.out_uri, frame["image_id"].tolist(), embeddings, storage_cfg)
    before = balance_metrics(frame, emb, None, top, groups, cfg)
    after = balance_metrics(frame, emb, repeats, top, groups, cfg)
    per = {}
    for name in sorted(set(frame["dataset"])):
        sel = (frame["dataset"] == name).to_numpy()
        per[name] = {"kept": int(sel.sum()), "sampled_images": int((repeats[sel] > 0).sum()),
                     "samples_per_epoch": int(repeats[sel].sum())}
    meta = {"stage": "balance", "target_size": target, "samples_per_epoch": sampled,
            "sampled_images": int((repeats > 0).sum()), "max_repeat": cfg.max_repeat, "seed": cfg.seed,
            "groups_from": cfg.mapping_file or cfg.group_by, "top_cluster_column": cluster_cols[-1],
            "datasets": per, "before": before, "after": after}
    log.info("balance: %d kept images -> %d samples/epoch from %d images; largest dataset share %.2f -> %.2f",
             len(frame), sampled, meta["sampled_images"], before["largest_dataset_share"],
             after["largest_dataset_share"])
    return meta
