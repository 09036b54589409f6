"""The balance stage's two passes over row-range shards of ``deduplicated.parquet`` + ``clusters.parquet``, here or
as Ray tasks (``curation.shards``), the same code either way (docs/curation.md, "Balance", Scale).

Pass 1 (:func:`_count_shard`) counts per shard: images per leaf of the sampling tree (group, c_T, ..., c_1), per
top cluster × dataset / cell type, the groups present; and returns each row's (leaf, hash). The driver merges the
counts, checks the groups against the mapping / ``group_weights``, computes every leaf's budget top-down
(:func:`balance.leaf_budgets`) and, from the (leaf, hash) per row — 12 bytes a row, the one array on the driver
that grows with the rows — each leaf's extra-repeat cutoff. Pass 2 (:func:`_write_shard`) writes each shard's rows
with group, weight and repeats (Ray: part files from the tasks; here: tables back to the driver, published as
single files) and returns the counts after balancing and its candidates for the mixing-score samples
(``balance.mixing_sample`` rows drawn ∝ weight by exponential race), whose embeddings alone are then read.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from cytoray.curation.balance import (
    GROUP_COLUMNS,
    BalanceConfig,
    BalanceError,
    category_counts,
    cell_type_warning,
    check_group_by,
    check_groups,
    extra_cutoffs,
    group_names,
    group_weight,
    image_hashes,
    largest_shares,
    leaf_budgets,
    leaf_repeats,
    mapping_template,
    metrics_from_counts,
    mixing_score,
    read_mapping,
    sample_keys,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Inputs:
    """What a shard task reads (small: put in the object store once)."""

    rows: object  # shards.Layout of deduplicated.parquet
    clusters: object  # shards.Layout of clusters.parquet (same rows, same order)
    cluster_cols: tuple  # cluster_l1 ... cluster_lT (finest first)
    cfg: BalanceConfig
    mapping: dict | None
    storage_cfg: object


@dataclass(frozen=True)
class _Plan:
    """Pass 2's inputs: the leaves with their budgets and extra-repeat cutoffs, where to write."""

    inputs: _Inputs
    leaf_index: dict  # (group, c_T, ..., c_1) -> leaf
    budgets: np.ndarray
    sizes: np.ndarray
    cut_hash: np.ndarray
    cut_row: np.ndarray
    group_weight: dict
    unbalanced_uri: str | None  # Ray: part files go here; None: tables come back to the driver
    balanced_uri: str | None


def _read_shard(inp: _Inputs, start: int, stop: int, columns=None):
    """Rows [start, stop) of deduplicated.parquet (``columns``) and their cluster ids (n, T), finest first."""
    from cytoray.curation.shards import read_rows

    t = read_rows(inp.rows, start, stop, columns, inp.storage_cfg)
    c = read_rows(inp.clusters, start, stop, ["image_id", *inp.cluster_cols], inp.storage_cfg)
    if not c.column("image_id").equals(t.column("image_id")):
        raise AssertionError("clusters.parquet rows do not match deduplicated.parquet; rerun the cluster stage "
                             "(force=true)")
    labels = np.stack([c.column(n).to_numpy() for n in inp.cluster_cols], 1).astype(np.int64)
    return t, c, labels.reshape(t.num_rows, len(inp.cluster_cols))


def _shard_leaves(t, labels, inp: _Inputs):
    """(group per row, leaves [(group, c_T, ..., c_1)], leaf of each row, images per leaf) of one shard."""
    column = inp.cfg.group_by if inp.mapping is None and inp.cfg.group_by != "none" else None
    groups = group_names(t.column(column).to_pylist() if column else None, labels[:, -1], inp.cfg, inp.mapping)
    names, code = np.unique(groups, return_inverse=True)
    keys = np.column_stack([code.reshape(-1), labels[:, ::-1]])
    leaves, leaf_of_row, sizes = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    return groups, [(str(names[r[0]]), *r[1:]) for r in leaves.tolist()], leaf_of_row.reshape(-1), sizes


def _str_column(t, name: str) -> np.ndarray:
    return np.array([("unlabelled" if v is None else str(v)) for v in t.column(name).to_pylist()], dtype=str)


def _counter(keys) -> dict:
    out: dict = {}
    for k in keys:
        out[k] = out.get(k, 0) + 1
    return out


def _count_shard(shard: tuple, inp: _Inputs) -> dict:
    """Pass 1: counts per leaf, dataset, cell type and top cluster (and top cluster × dataset / cell type), and
    each row's (leaf, hash)."""
    a, b = shard
    column = [inp.cfg.group_by] if inp.mapping is None and inp.cfg.group_by in GROUP_COLUMNS else []
    t, _, labels = _read_shard(inp, a, b, list(dict.fromkeys(["image_id", "dataset", "cell_type", *column])))
    groups, leaves, leaf_of_row, sizes = _shard_leaves(t, labels, inp)
    top = labels[:, -1].tolist()
    ds, ct = _str_column(t, "dataset").tolist(), _str_column(t, "cell_type").tolist()
    return {"leaves": leaves, "sizes": sizes, "leaf_of_row": leaf_of_row.astype(np.int32),
            "hashes": image_hashes(t.column("image_id").to_pylist(), inp.cfg.seed), "groups": set(groups.tolist()),
            "cluster_dataset": _counter(zip(top, ds)), "cluster_cell_type": _counter(zip(top, ct))}


def _write_shard(shard: tuple, plan: _Plan) -> dict:
    """Pass 2: rows [a, b) with cluster ids, group, weight and repeats (written as part ``i`` when the plan says
    where); the counts after balancing and this shard's candidates for the mixing samples."""
    import pyarrow as pa

    from cytoray.curation.shards import write_part

    i, a, b = shard
    inp = plan.inputs
    t, c, labels = _read_shard(inp, a, b)
    ids = t.column("image_id").to_pylist()
    groups, leaves, leaf_of_row, _ = _shard_leaves(t, labels, inp)
    leaf = np.array([plan.leaf_index[x] for x in leaves], np.int64)[leaf_of_row] if len(ids) else \
        np.zeros(0, np.int64)
    rows = np.arange(a, b, dtype=np.int64)
    repeats = leaf_repeats(leaf, image_hashes(ids, inp.cfg.seed), rows, plan.budgets, plan.sizes,
                           plan.cut_hash, plan.cut_row)
    weights = np.array([plan.group_weight.get(g, 1.0) for g in groups.tolist()], np.float64)
    for name in inp.cluster_cols:
        t = t.append_column(name, c.column(name))
    t = (t.append_column("group", pa.array(groups.tolist(), pa.string()))
         .append_column("weight", pa.array(weights, pa.float32()))
         .append_column("repeats", pa.array(repeats, pa.int32())))
    sampled = t.filter(pa.array(repeats > 0))
    out: dict = {}
    if plan.unbalanced_uri:
        write_part(plan.unbalanced_uri, i, t, inp.storage_cfg)
        write_part(plan.balanced_uri, i, sampled, inp.storage_cfg)
    else:
        out["tables"] = (t, sampled)
    ds, ct = _str_column(t, "dataset"), _str_column(t, "cell_type")
    reps = repeats.astype(np.float64)
    out["after"] = {"dataset": category_counts(ds, reps) if len(ds) else {}, "group": category_counts(groups, reps) if len(ds) else {},
                    "cell_type": category_counts(ct, reps) if len(ds) else {},
                    "cluster": category_counts(labels[:, -1], reps) if len(ds) else {}}
    out["before"] = {k: category_counts(v) if len(ds) else {} for k, v in
                     (("dataset", ds), ("group", groups), ("cell_type", ct), ("cluster", labels[:, -1]))}
    out["sampled"] = category_counts(ds, (repeats > 0).astype(np.float64)) if len(ds) else {}
    # mixing-score candidates: the shard's smallest sample keys, before (weight 1) and after (weight = repeats)
    mix = image_hashes(ids, inp.cfg.seed, "mixing:")
    out["mixing"] = {}
    for name, w in (("before", np.ones(len(ids))), ("after", reps)):
        key = sample_keys(mix, w)
        top = np.lexsort((rows, key))[:inp.cfg.mixing_sample]
        top = top[np.isfinite(key[top])]
        out["mixing"][name] = (key[top], rows[top], ds[top], w[top], [ids[j] for j in top.tolist()])
    return out


def _merge_counts(parts: list[dict]) -> dict:
    out: dict = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def balance_shards(run, cfg: BalanceConfig, embeddings: str | None, storage_cfg, scale) -> dict:
    """The stage body (``run``: a ``stage.StageRun``); returns the stage summary."""
    from cytoray.curation import shards
    from cytoray.manifest import cluster_columns

    check_group_by(cfg)
    if cfg.target_size is not None and cfg.target_size < 0:
        raise BalanceError(f"balance.target_size={cfg.target_size} must be >= 0")
    mapping = read_mapping(cfg.mapping_file, storage_cfg) if cfg.mapping_file else None
    rows_lay = shards.layout(run.uri("deduplicated.parquet"), storage_cfg)
    clus_lay = shards.layout(run.uri("clusters.parquet"), storage_cfg)
    if clus_lay.rows != rows_lay.rows:
        raise AssertionError("clusters.parquet rows do not match deduplicated.parquet; rerun the cluster stage "
                             "(force=true)")
    cluster_cols = tuple(cluster_columns(clus_lay.schema.names))
    inp = _Inputs(rows_lay, clus_lay, cluster_cols, cfg, mapping, storage_cfg)
    n = rows_lay.rows
    ray_tasks = shards.use_ray(scale, n)
    ranges = rows_lay.ranges(scale.shard_rows)
    size = lambda s: s[-1] - s[-2]  # noqa: E731

    # pass 1: counts per shard -> the leaves of the sampling tree, their budgets and extra-repeat cutoffs
    counted = shards.map_shards(_count_shard, ranges, inp, ray_tasks=ray_tasks, cfg=scale, desc="balance: count",
                                rows=size)
    present = set().union(*(r["groups"] for r in counted))
    top_present = {c for r in counted for c, _ in r["cluster_dataset"]}
    check_groups(cfg, mapping, top_present, present)
    gw = group_weight(cfg, mapping)
    leaf_size: dict = {}
    for r in counted:
        for leaf, s in zip(r["leaves"], r["sizes"].tolist()):
            leaf_size[leaf] = leaf_size.get(leaf, 0) + s
    leaves = sorted(leaf_size)  # by group name, then clusters top down: the tree's child order
    leaf_index = {x: j for j, x in enumerate(leaves)}
    group_code = {g: j for j, g in enumerate(sorted(present))}
    keys = np.array([(group_code[x[0]], *x[1:]) for x in leaves], np.int64).reshape(len(leaves), len(cluster_cols) + 1)
    sizes = np.array([leaf_size[x] for x in leaves], np.int64)
    top_weight = np.array([gw.get(x[0], 1.0) for x in leaves], np.float64)
    if cfg.enabled:
        target = int(cfg.target_size if cfg.target_size is not None else n)
        budgets = leaf_budgets(keys, sizes, top_weight, target, cfg.max_repeat)
    else:  # balance.enabled=false: every kept image once per epoch, so the counts are those of the manifest
        target, budgets = n, sizes.copy()
    # the one O(rows) array on the driver: each row's leaf (int32) and hash (uint64), in row order
    leaf_of_row = np.concatenate([np.array([leaf_index[x] for x in r["leaves"]], np.int32)[r["leaf_of_row"]]
                                  if len(r["leaf_of_row"]) else np.zeros(0, np.int32) for r in counted])
    hashes = np.concatenate([r["hashes"] for r in counted])
    cut_hash, cut_row = extra_cutoffs(leaf_of_row, hashes, budgets, sizes)
    del leaf_of_row, hashes
    by_cluster_ds, by_cluster_ct = _nested(counted, "cluster_dataset"), _nested(counted, "cluster_cell_type")
    del counted

    # pass 2: every shard's rows with their repeats -> unbalanced / balanced (Ray: part files from the tasks)
    for name in ("unbalanced.parquet", "balanced.parquet"):
        shards.remove(run.uri(name), storage_cfg)
    plan = _Plan(inp, leaf_index, budgets, sizes, cut_hash, cut_row, gw,
                 run.uri("unbalanced.parquet") if ray_tasks else None,
                 run.uri("balanced.parquet") if ray_tasks else None)
    written = shards.map_shards(_write_shard, [(i, a, b) for i, (a, b) in enumerate(ranges)], plan,
                                ray_tasks=ray_tasks, cfg=scale, desc="balance: write", rows=size)
    if not ray_tasks:
        import pyarrow as pa

        run.publish("unbalanced.parquet", pa.concat_tables([w["tables"][0] for w in written]), sort=False)
        run.publish("balanced.parquet", pa.concat_tables([w["tables"][1] for w in written]), sort=False)
    sizes_top = {c: sum(v.values()) for c, v in by_cluster_ds.items()}
    run.publish_bytes("group_mapping_template.csv",
                      mapping_template(sizes_top, by_cluster_ds, by_cluster_ct, cluster_cols[-1]).encode())

    # metrics from the counts; the kNN mixing score on the sample drawn ∝ weight
    samples = {k: _mixing_sample([w["mixing"][k] for w in written], cfg.mixing_sample) for k in ("before", "after")}
    emb = _sample_embeddings(run, samples, n, embeddings, storage_cfg, scale, ray_tasks)
    counts = {k: {c: _merge_counts([w[k][c] for w in written]) for c in ("dataset", "group", "cell_type", "cluster")}
              for k in ("before", "after")}
    sampled_per = _merge_counts([w["sampled"] for w in written])
    sampled_images = int(round(sum(sampled_per.values())))
    metrics = {}
    for k, images in (("before", n), ("after", sampled_images)):
        _, _, ds, w, ids = samples[k]
        score = mixing_score(np.stack([emb[i] for i in ids]) if ids else np.zeros((0, 1), np.float32), ds, w,
                             cfg.mixing_k)
        metrics[k] = metrics_from_counts(counts[k], images, score)
    before, after = metrics["before"], metrics["after"]
    groups_from = cfg.mapping_file or cfg.group_by
    shares = largest_shares(before, after, groups_from)
    warning = cell_type_warning(shares, groups_from) if cfg.enabled else None
    sampled = after["samples_per_epoch"]
    if sampled < target:
        log.warning("balance: only %d of target %d samples possible (max_repeat=%d, zero-weight groups); "
                    "raise balance.max_repeat for more", sampled, target, cfg.max_repeat)
    per = {name: {"kept": int(kept), "sampled_images": int(round(sampled_per.get(name, 0))),
                  "samples_per_epoch": int(round(counts["after"]["dataset"].get(name, 0)))}
           for name, kept in counts["before"]["dataset"].items()}
    meta = {"stage": "balance", "enabled": cfg.enabled, "target_size": target, "samples_per_epoch": sampled,
            "sampled_images": sampled_images, "max_repeat": cfg.max_repeat, "seed": cfg.seed,
            "groups_from": groups_from, "top_cluster_column": cluster_cols[-1],
            "datasets": per, "largest_share": shares, "warnings": [warning] if warning else [],
            "before": before, "after": after}
    log.info("balance: %d kept images -> %d samples/epoch from %d images; largest share before -> after %s",
             n, sampled, sampled_images, shares)
    return meta


def _nested(counted: list[dict], key: str) -> dict:
    """cluster -> name -> images, from the shards' (cluster, name) counts."""
    out: dict = {}
    for r in counted:
        for (c, name), v in r[key].items():
            inner = out.setdefault(c, {})
            inner[name] = inner.get(name, 0) + v
    return out


def _mixing_sample(candidates: list[tuple], sample: int):
    """The ``sample`` smallest keys over the shards' candidates, in row order: (key, row, dataset, weight, ids)."""
    key = np.concatenate([c[0] for c in candidates])
    rows = np.concatenate([c[1] for c in candidates])
    ds = np.concatenate([c[2] for c in candidates])
    w = np.concatenate([c[3] for c in candidates])
    ids = [i for c in candidates for i in c[4]]
    pick = np.lexsort((rows, key))[:sample]
    pick = pick[np.argsort(rows[pick], kind="stable")]
    return key[pick], rows[pick], ds[pick], w[pick], [ids[j] for j in pick.tolist()]


def _sample_embeddings(run, samples: dict, num_rows: int, source: str | None, storage_cfg, scale,
                       ray_tasks: bool) -> dict:
    """image_id -> normalised embedding for the rows of the mixing samples: from embeddings.parquet (only those
    rows, found through dedup's kept-row mask), or a user's ``source`` (the cluster stage's loader)."""
    from cytoray.curation import shards
    from cytoray.curation.cluster import load_stage_embeddings

    rows = np.concatenate([samples[k][1] for k in samples])
    ids = [i for k in samples for i in samples[k][4]]
    rows, first = np.unique(rows, return_index=True)
    ids = [ids[j] for j in first.tolist()]
    if not len(rows):
        return {}
    if source and source.endswith(".npy"):
        from cytoray import storage

        x = np.load(io.BytesIO(storage.read_bytes(source, storage_cfg)), mmap_mode=None)
        if x.ndim != 2 or len(x) != num_rows:
            raise ValueError(f"cluster.embeddings {source}: shape {x.shape}, expected ({num_rows}, D) — one row "
                             "per row of deduplicated.parquet, in its order")
        emb = x[rows].astype(np.float32)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    elif source:
        emb = load_stage_embeddings(run.out_uri, ids, source, storage_cfg)
    else:
        mask = shards.load_mask(run.out_uri, storage_cfg=storage_cfg)
        if int(mask.sum()) != num_rows:
            raise AssertionError(f"{shards.KEPT_MASK} keeps {int(mask.sum())} rows, deduplicated.parquet has "
                                 f"{num_rows}; rerun the dedup stage (force=true)")
        at = _kept_positions(mask, rows)
        lay = shards.layout(run.uri("embeddings.parquet"), storage_cfg)
        tasks = []
        for a, b in lay.ranges(scale.shard_rows):
            lo, hi = np.searchsorted(at, [a, b])
            if hi > lo:
                tasks.append((at[lo:hi], ids[lo:hi]))
        got = shards.map_shards(_embedding_rows, tasks, lay, storage_cfg, ray_tasks=ray_tasks, cfg=scale,
                                desc="balance: mixing sample embeddings")
        emb = np.concatenate(got)
    return dict(zip(ids, emb))


def _kept_positions(mask: np.ndarray, rows: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """Row numbers in ingested/embeddings.parquet of deduplicated rows ``rows`` (sorted), chunk by chunk."""
    out = np.empty(len(rows), np.int64)
    done = before = 0
    for a in range(0, len(mask), chunk):
        pos = np.flatnonzero(mask[a:a + chunk])
        hi = int(np.searchsorted(rows, before + len(pos)))
        out[done:hi] = a + pos[rows[done:hi] - before]
        done, before = hi, before + len(pos)
    return out


def _embedding_rows(task: tuple, lay, storage_cfg) -> np.ndarray:
    """Normalised embeddings of the given rows of embeddings.parquet (reading only their row groups)."""
    from cytoray.curation.shards import read_rows
    from cytoray.tables import unpack_vectors

    at, ids = task
    out = []
    for _, _, first, num in lay.groups:
        lo, hi = np.searchsorted(at, [first, first + num])
        if hi == lo:
            continue
        t = read_rows(lay, first, first + num, ["image_id", "embedding"], storage_cfg).take(at[lo:hi] - first)
        if t.column("image_id").to_pylist() != list(ids[lo:hi]):
            raise AssertionError("embeddings.parquet rows do not follow kept_rows.npy and deduplicated.parquet; "
                                 "rerun the dedup stage (force=true)")
        out.append(unpack_vectors(t.column("embedding")))
    emb = np.concatenate(out)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def run_balance(out_uri: str, cfg: BalanceConfig, storage_cfg=None, force: bool = False,
                embeddings: str | None = None,
                scale=None) -> dict:
    """Balance stage: ``deduplicated.parquet`` + ``clusters.parquet`` -> ``unbalanced.parquet`` (every kept
    image with cluster ids, group, weight, repeats) and ``balanced.parquet`` (rows with repeats >= 1), the
    mapping template ``group_mapping_template.csv`` and before/after balance metrics. ``scale``
    (``shards.ScaleConfig``): Ray tasks over shards or this process; the outputs are the same, written as
    directories of part files by the Ray path."""
    from cytoray.curation.shards import ScaleConfig
    from cytoray.curation.stage import run_stage

    settings = {"balance": cfg, "embeddings": embeddings}
    scale = scale or ScaleConfig()
    return run_stage("balance", out_uri, settings,
                     lambda run: balance_shards(run, cfg, embeddings, storage_cfg, scale), storage_cfg, force)
