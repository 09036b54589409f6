"""RudolfV-style rebalancing: groups (from metadata or an expert's mapping file, with weights) on top of the
hierarchical k-means tree, balanced top-down sampling to a target size, and balance metrics.

Sampling tree: root -> group -> coarsest cluster -> ... -> finest cluster -> images. A node's budget is
split over its children by a *cap search* (Vo et al. 2024's balanced hierarchical sampling, with
RudolfV's weights): find the cap ``c`` with ``Σ_i min(w_i · c, capacity_i) = budget``, where
``capacity_i = size_i × max_repeat`` — small children get everything they have (repeated up to
``max_repeat`` times), large ones are cut to the common cap. Integer budgets use largest-remainder rounding
(ties by child order). The split needs only the image count under each node, so the tree is built from the
counts per leaf (group, c_T, ..., c_1) (:func:`leaf_budgets`). A leaf with budget ``b`` over ``n`` images gives
each image ``b // n`` repeats and the ``b mod n`` extra repeats to the images with the smallest 64-bit hash of
``f"{seed}:{image_id}"`` (blake2b; ties by row), so the result is deterministic for a seed, the same in every
process and independent of how the rows are sharded.

Output per kept image: ``group``, ``weight`` (the group weight), ``repeats`` (times it appears per epoch;
0 = not sampled). The balanced manifest is the rows with ``repeats >= 1``; the unbalanced one keeps every
deduplicated row with its cluster ids, for comparison.

The stage (``balance_passes.run_balance``) reads its inputs in row-range shards (``curation.shards``), here or as Ray
tasks, with the same code either way: pass 1 counts per shard (leaves, datasets, cell types, clusters) and
returns each row's (leaf, hash) — 12 bytes per row, the one array on the driver that grows with the rows —
from which the driver computes every leaf's budget and extra-repeat cutoff; pass 2 writes each shard's rows
with their repeats (Ray: one part file per shard) and returns the counts after balancing and a candidate
sample for the mixing score.

Mapping file (CSV, the report writes a template): ``cluster,group,weight`` per coarsest-level cluster. A
weight of 0 drops the cluster (e.g. one an expert names "artefacts"); clusters missing from the file are
an error (never silently dropped), as are unknown columns, negative weights and one group given different
weights.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field

import numpy as np

from cytoray.config import location_field
from cytoray.errors import UserError

log = logging.getLogger(__name__)

GROUP_COLUMNS = ("dataset", "modality", "cell_type", "patient_label")


@dataclass
class BalanceConfig:
    enabled: bool = True
    target_size: int | None = None  # sampled rows per epoch (incl. repeats); default: the kept image count
    group_by: str = "dataset"  # dataset | modality | cell_type | patient_label | none
    group_weights: dict[str, float] = field(default_factory=dict)  # per group (missing: 1.0)
    mapping_file: str | None = location_field()  # CSV cluster,group,weight over the coarsest clusters; replaces group_by
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


def image_hashes(image_ids, seed: int, salt: str = "") -> np.ndarray:
    """uint64 per id: blake2b of ``f"{seed}:{salt}{image_id}"`` — stable across processes and runs (unlike
    Python's ``hash``)."""
    digests = b"".join(hashlib.blake2b(f"{seed}:{salt}{k}".encode(), digest_size=8).digest() for k in image_ids)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def leaf_budgets(leaf_keys: np.ndarray, leaf_sizes: np.ndarray, top_weight: np.ndarray, target: int,
                 max_repeat: int) -> np.ndarray:
    """Samples per leaf of the sampling tree, from counts only. ``leaf_keys`` (L, D): one row per leaf, the
    node key per level (top first), unique and sorted lexicographically; ``leaf_sizes`` (L,): images per leaf;
    ``top_weight`` (L,): the weight of each leaf's top-level node (nodes below weigh 1)."""
    leaf_keys = np.asarray(leaf_keys, np.int64)
    num_leaves, depth_max = leaf_keys.shape if leaf_keys.ndim == 2 else (0, 0)
    first = np.concatenate([[0], np.cumsum(np.asarray(leaf_sizes, np.int64))])
    budgets = np.zeros(num_leaves, np.int64)

    def visit(lo: int, hi: int, depth: int, budget: int) -> None:
        if budget <= 0 or lo == hi:
            return
        if depth == depth_max:  # one leaf: keys are unique
            budgets[lo] = budget
            return
        k = leaf_keys[lo:hi, depth]
        starts = lo + np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
        ends = np.append(starts[1:], hi)
        w = np.asarray(top_weight, np.float64)[starts] if depth == 0 else np.ones(len(starts))
        alloc = cap_allocation(first[ends] - first[starts], w, budget, max_repeat)
        for a, b, c in zip(starts.tolist(), ends.tolist(), alloc.tolist()):
            visit(a, b, depth + 1, c)

    visit(0, num_leaves, 0, int(target))
    return budgets


def extra_cutoffs(leaf_of_row: np.ndarray, hashes: np.ndarray, budgets: np.ndarray, leaf_sizes: np.ndarray):
    """Per leaf, the (hash, row) of the last image that gets one of the leaf's ``budget mod size`` extra repeats:
    they go to the images with the smallest (hash, row). Rows are global positions (index into the arrays).
    Returns (cut_hash uint64, cut_row int64; -1 where a leaf has no extra repeat)."""
    sizes = np.asarray(leaf_sizes, np.int64)
    extra = budgets - (budgets // np.maximum(sizes, 1)) * sizes
    order = np.lexsort((np.arange(len(hashes)), hashes, leaf_of_row))  # by leaf, hash, row
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    cut_hash = np.zeros(len(sizes), np.uint64)
    cut_row = np.full(len(sizes), -1, np.int64)
    has = extra > 0
    pos = order[starts[has] + extra[has] - 1]
    cut_hash[has], cut_row[has] = hashes[pos], pos
    return cut_hash, cut_row


def leaf_repeats(leaf: np.ndarray, hashes: np.ndarray, rows: np.ndarray, budgets: np.ndarray,
                 leaf_sizes: np.ndarray, cut_hash: np.ndarray, cut_row: np.ndarray) -> np.ndarray:
    """Repeats per image: ``budget // size`` of its leaf, plus one if its (hash, row) is at most the leaf's cutoff
    (:func:`extra_cutoffs`)."""
    base = budgets[leaf] // leaf_sizes[leaf]
    ch, cr = cut_hash[leaf], cut_row[leaf]
    extra = (hashes < ch) | ((hashes == ch) & (rows <= cr))
    return base + extra.astype(np.int64)


def hierarchical_sample(keys: list[np.ndarray], node_weight: np.ndarray, target: int, max_repeat: int,
                        seed: int, image_ids=None) -> np.ndarray:
    """Repeats per image, in memory (the stage runs the same steps over shards). ``keys``: one int array per
    tree level, top first (group, coarse ... fine cluster); ``node_weight``: weight of each image's top-level
    node (children below weigh 1; the first image's weight counts for its node); ``image_ids``: what the
    extra repeats are hashed on (default: the row number)."""
    n = len(keys[0]) if keys else 0
    if n == 0:
        return np.zeros(0, np.int64)
    leaves, first, leaf_of_row, sizes = np.unique(np.stack(keys, 1).astype(np.int64), axis=0, return_index=True,
                                                  return_inverse=True, return_counts=True)
    leaf_of_row = leaf_of_row.reshape(-1)
    top_first = {}
    for k, w in zip(np.asarray(keys[0])[np.sort(first)].tolist(), np.asarray(node_weight)[np.sort(first)].tolist()):
        top_first.setdefault(k, w)
    top_weight = np.array([top_first[k] for k in leaves[:, 0].tolist()], np.float64)
    budgets = leaf_budgets(leaves, sizes, top_weight, target, max_repeat)
    ids = [str(i) for i in range(n)] if image_ids is None else image_ids
    hashes = image_hashes(ids, seed)
    cut_hash, cut_row = extra_cutoffs(leaf_of_row, hashes, budgets, sizes)
    return leaf_repeats(leaf_of_row, hashes, np.arange(n), budgets, sizes, cut_hash, cut_row)


def read_mapping(uri: str, storage_cfg=None) -> dict[int, tuple[str, float]]:
    """cluster -> (group, weight) from the expert's CSV (columns cluster,group,weight); every cluster of a group
    carries the same weight."""
    import csv

    from cytoray import storage

    text = storage.read_bytes(uri, storage_cfg).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    need = {"cluster", "group", "weight"}
    if not reader.fieldnames or not need <= set(reader.fieldnames):
        raise BalanceError(f"balance.mapping_file {uri}: columns must include cluster,group,weight "
                           f"(found {reader.fieldnames}); start from the template the report writes")
    out, group_weight = {}, {}
    for line, row in enumerate(reader, start=2):
        try:
            c, w = int(row["cluster"]), float(row["weight"])
        except ValueError as exc:
            raise BalanceError(f"balance.mapping_file {uri} line {line}: {exc}") from None
        if w < 0 or not np.isfinite(w):
            raise BalanceError(f"balance.mapping_file {uri} line {line}: weight {w} must be finite and >= 0")
        g = row["group"].strip()
        if not g:
            raise BalanceError(f"balance.mapping_file {uri} line {line}: empty group name")
        if group_weight.setdefault(g, w) != w:
            raise BalanceError(f"balance.mapping_file {uri} line {line}: group {g!r} has weight {w} here and "
                               f"{group_weight[g]} on an earlier line; a group has one weight (to drop one cluster, "
                               "give it a group of its own with weight 0)")
        out[c] = (g, w)
    return out


def check_group_by(cfg: BalanceConfig) -> None:
    if not cfg.mapping_file and cfg.group_by != "none" and cfg.group_by not in GROUP_COLUMNS:
        raise BalanceError(f"balance.group_by={cfg.group_by!r}: choose one of {list(GROUP_COLUMNS) + ['none']}")


def group_names(values, top_clusters: np.ndarray, cfg: BalanceConfig, mapping: dict | None) -> np.ndarray:
    """Group name per image (str array): from the mapping (``""`` for a cluster it lacks; :func:`check_groups`
    reports those) or the ``group_by`` column's ``values`` (null: ``unlabelled``)."""
    if mapping is not None:
        return np.array([mapping[c][0] if c in mapping else "" for c in top_clusters.tolist()], dtype=str)
    if cfg.group_by == "none":
        return np.full(len(top_clusters), "all")
    return np.array([("unlabelled" if v is None or v != v else str(v)) for v in values], dtype=str)


def check_groups(cfg: BalanceConfig, mapping: dict | None, top_clusters: set, groups: set) -> None:
    """The mapping covers every top cluster present; ``group_weights`` names only groups present, none < 0."""
    if mapping is not None:
        missing = sorted(set(top_clusters) - set(mapping))
        if missing:
            raise BalanceError(f"balance.mapping_file {cfg.mapping_file} has no row for clusters {missing[:20]}; "
                               "give every cluster a group and weight (weight 0 drops it)")
        return
    unknown = sorted(set(cfg.group_weights) - set(groups))
    if unknown:
        raise BalanceError(f"balance.group_weights names groups {unknown} that are not values of "
                           f"{cfg.group_by!r} (present: {sorted(groups)[:20]})")
    if any(float(w) < 0 for w in cfg.group_weights.values()):
        raise BalanceError("balance.group_weights must be >= 0")


def group_weight(cfg: BalanceConfig, mapping: dict | None) -> dict[str, float]:
    """Weight per group name (groups not named: 1.0)."""
    if mapping is not None:
        return {g: w for g, w in mapping.values()}
    return {str(g): float(w) for g, w in cfg.group_weights.items()}


def assign_groups(frame, top_clusters: np.ndarray, cfg: BalanceConfig, storage_cfg=None):
    """(group name per image, weight per image) from the mapping file or the ``group_by`` column."""
    check_group_by(cfg)
    mapping = read_mapping(cfg.mapping_file, storage_cfg) if cfg.mapping_file else None
    values = frame[cfg.group_by] if mapping is None and cfg.group_by != "none" else None
    groups = group_names(values, np.asarray(top_clusters), cfg, mapping)
    check_groups(cfg, mapping, set(np.asarray(top_clusters).tolist()), set(groups.tolist()))
    gw = group_weight(cfg, mapping)
    return groups.astype(object), np.array([gw.get(g, 1.0) for g in groups.tolist()], np.float64)


# ---------------------------------------------------------------------------------------------- metrics


def category_counts(values, weights=None) -> dict:
    """Category (as str, sorted) -> count or summed weight."""
    vals, inv = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    w = np.bincount(inv.reshape(-1), weights=weights, minlength=len(vals)).astype(np.float64)
    return dict(zip(vals.tolist(), w.tolist()))


def stats_from_counts(counts: dict) -> dict:
    """Normalised entropy (1 = uniform over the categories present) and KL to uniform of a category -> count
    dict."""
    c = np.array([v for v in counts.values() if v > 0], np.float64)
    p = c / c.sum()
    h = float(-(p * np.log(p)).sum())
    k = len(p)
    return {"categories": k, "entropy": round(h, 4), "normalized_entropy": round(h / np.log(k), 4) if k > 1 else 1.0,
            "kl_to_uniform": round(float(np.log(k) - h), 4), "largest_share": round(float(p.max()), 4)}


def distribution_stats(values, weights=None) -> dict:
    """:func:`stats_from_counts` of ``values`` (weighted)."""
    return stats_from_counts(category_counts(values, weights))


def mixing_score(emb: np.ndarray, datasets: np.ndarray, weights: np.ndarray, k: int) -> float:
    """Batch-effect score on the rows given: mean share of an image's k nearest neighbours (cosine) that come
    from another dataset, weighted by ``weights``, divided by the share expected if datasets were perfectly
    mixed (1 - Σ p_d²). 1 = no dataset signature in the embedding; near 0 = datasets form separate islands."""
    import faiss

    if len(emb) <= k or len(set(datasets.tolist())) < 2:
        return float("nan")
    x = np.ascontiguousarray(emb, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, nbrs = index.search(x, k + 1)
    w = np.asarray(weights, np.float64)
    other = (datasets[nbrs[:, 1:]] != datasets[:, None]).mean(1)
    p = np.array(list(category_counts(datasets, w).values()))
    p = p / p.sum()
    expected = 1.0 - float((p ** 2).sum())
    return round(float((other * w).sum() / w.sum()) / expected, 4)


def knn_mixing(emb: np.ndarray, datasets: np.ndarray, weights: np.ndarray, k: int, sample: int, seed: int) -> float:
    """:func:`mixing_score` on the images with weight > 0, ``sample`` of them drawn ∝ weight above that (so the
    score describes what training sees)."""
    keep = np.flatnonzero(weights > 0)
    if len(keep) > sample:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(keep, sample, replace=False, p=weights[keep] / weights[keep].sum()))
    return mixing_score(emb[keep], np.asarray(datasets)[keep], weights[keep], k)


def sample_keys(hashes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted sampling without replacement by exponential race (Efraimidis & Spirakis 2006): the ``m``
    smallest keys ``-log(u) / w`` are a sample of ``m`` drawn ∝ w; ``u`` from the image hash. inf where w = 0."""
    u = ((hashes >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    with np.errstate(divide="ignore"):
        return np.where(weights > 0, -np.log(u) / np.asarray(weights, np.float64), np.inf)


def labelled_largest_share(counts: dict) -> float | None:
    """Largest share among the labelled categories of a category -> count dict (``unlabelled`` left out); None when
    nothing is labelled."""
    c = [v for k, v in counts.items() if k != "unlabelled" and v > 0]
    return round(max(c) / sum(c), 4) if c else None


def mixing_or_reason(score: float, dataset_counts: dict) -> float | str:
    """The kNN mixing score, or why it does not apply: a string, never NaN (one dataset has nothing to mix with;
    NaN is not JSON and a NaN in a stage marker never equals itself)."""
    if sum(v > 0 for v in dataset_counts.values()) < 2:
        return "n/a (one dataset)"
    return score if np.isfinite(score) else "n/a (too few images)"


def metrics_from_counts(counts: dict, images: int, mixing: float) -> dict:
    """The before/after balance metrics from category -> samples counts (dataset, group, cell_type, cluster);
    ``largest_cell_type_share`` is over the labelled images (None when none is labelled)."""
    return {
        "images": int(images), "samples_per_epoch": int(round(sum(counts["dataset"].values()))),
        "dataset": stats_from_counts(counts["dataset"]), "group": stats_from_counts(counts["group"]),
        "cell_type": stats_from_counts(counts["cell_type"]), "cluster": stats_from_counts(counts["cluster"]),
        "largest_dataset_share": stats_from_counts(counts["dataset"])["largest_share"],
        "largest_cell_type_share": labelled_largest_share(counts["cell_type"]),
        "knn_dataset_mixing": mixing_or_reason(mixing, counts["dataset"]),
        "counts": counts,
    }


def grouping_column(groups_from: str) -> str | None:
    """What the sampling tree's top level groups by: a ``GROUP_COLUMNS`` name, ``group`` for a mapping file's
    groups, None for ``group_by=none``."""
    return groups_from if groups_from in GROUP_COLUMNS else None if groups_from == "none" else "group"


def largest_shares(before: dict, after: dict, groups_from: str) -> dict:
    """name -> {before, after}: the largest share of the grouping (first; see :func:`grouping_column`), of the
    datasets and of the labelled cell types (left out when none is labelled), from :func:`metrics_from_counts`."""
    share = {"dataset": lambda m: m["largest_dataset_share"], "cell_type": lambda m: m["largest_cell_type_share"]}
    grouping = grouping_column(groups_from)
    names = list(dict.fromkeys([grouping] if grouping else []) | dict.fromkeys(["dataset", "cell_type"]))
    out = {}
    for name in names:
        get = share.get(name, lambda m: m["group"]["largest_share"])
        if get(before) is not None and get(after) is not None:
            out[name] = {"before": get(before), "after": get(after)}
    return out


def cell_type_warning(shares: dict, groups_from: str) -> str | None:
    """One line when balancing made cell types less balanced (their largest share went up, at the two decimals the
    stage line shows) under a grouping other than cell type."""
    ct, grouping = shares.get("cell_type"), grouping_column(groups_from)
    if ct is None or grouping == "cell_type" or round(ct["after"], 2) <= round(ct["before"], 2):
        return None
    how = f"the groups of balance.mapping_file={groups_from}" if grouping == "group" else \
        f"balance.group_by={groups_from}"
    return (f"balance: {how} made cell types less balanced: the largest cell-type share went {ct['before']:.2f} -> "
            f"{ct['after']:.2f}; balance.group_by=cell_type balances cell types instead")


def mapping_template(sizes: dict, datasets: dict, cell_types: dict, column: str) -> str:
    """CSV an expert edits into ``balance.mapping_file``: one row per coarsest cluster with its size and what it
    holds (``datasets`` / ``cell_types``: cluster -> name -> images; the three largest, ties by name); group
    defaults to the cluster's own name, weight to 1."""
    import csv

    def top3(d: dict) -> str:
        return "; ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:3])

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["cluster", "group", "weight", "images", "top_datasets", "top_cell_types"])
    for c in sorted(sizes):
        w.writerow([c, f"{column}_{c}", 1.0, sizes[c], top3(datasets.get(c, {})), top3(cell_types.get(c, {}))])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- the stage
