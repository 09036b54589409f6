"""``report.html``: one self-contained page an expert can review (every plot and thumbnail is embedded as a
data URI; no network, no side files).

Sections: counts per stage and dataset; bar charts before/after balancing by dataset, cell type, group and
top-level cluster with the balance metrics; one montage per top-level cluster (to name and weight clusters in
``group_mapping_template.csv``); the copy-detection counts, the verified-score distribution of removed vs kept-apart
candidate pairs and the lowest-scoring removals side by side with their score and transform; quarantine
reasons; a 2-D PCA map of the embeddings coloured by dataset and by cell type. A small script counts the
images the browser decoded and writes the figure into ``#render-check`` (the headless-browser test reads it).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass

import numpy as np

from cytoray.pages import RENDER_CHECK, page, png_uri, table

log = logging.getLogger(__name__)


@dataclass
class ReportConfig:
    enabled: bool = True
    thumbs_per_cluster: int = 12
    max_clusters: int = 40  # montages for the largest top-level clusters
    duplicate_pairs: int = 24
    quarantine_examples: int = 30
    thumb_size: int = 72
    map_points: int = 5000
    seed: int = 0


def _thumb(uri: str, size: int, storage_cfg) -> str:
    from PIL import Image

    from cytoray import images, storage

    try:
        rgb = images.decode(storage.read_bytes(uri, storage_cfg), min_side=1).rgb
    except Exception as exc:  # noqa: BLE001 - the report shows what it could not read instead of failing
        log.warning("report: cannot read %s for a thumbnail: %s", uri, exc)
        rgb = np.full((size, size, 3), 200, np.uint8)
    im = Image.fromarray(rgb)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _bars(before: dict, after: dict, title: str, top: int = 30):
    from cytoray.figures import figure

    keys = sorted(set(before) | set(after), key=lambda k: -before.get(k, 0))[:top]
    x = np.arange(len(keys))
    fig, ax = figure((max(5.0, 0.38 * len(keys) + 2), 3.2))
    tb, ta = sum(before.values()) or 1, sum(after.values()) or 1
    ax.bar(x - 0.2, [before.get(k, 0) / tb for k in keys], 0.4, label="before (kept images)")
    ax.bar(x + 0.2, [after.get(k, 0) / ta for k in keys], 0.4, label="after (samples per epoch)")
    ax.set_xticks(x, [str(k) for k in keys], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("share")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return png_uri(fig)


def _pca_maps(emb: np.ndarray, datasets: np.ndarray, cell_types: np.ndarray, cfg: ReportConfig) -> list[str]:
    from cytoray.figures import colormap, figure

    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.choice(len(emb), min(len(emb), cfg.map_points), replace=False))
    x = emb[idx] - emb[idx].mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    out = []
    for name, labels in (("dataset", datasets[idx]), ("cell type", cell_types[idx])):
        fig, ax = figure((6.5, 5))
        cats = sorted(set(labels.tolist()))
        cmap = colormap("tab20", max(len(cats), 1))
        for i, c in enumerate(cats):
            m = labels == c
            ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(i), label=f"{c} ({int(m.sum())})", alpha=0.75)
        ax.set_title(f"PCA of the embeddings, coloured by {name}")
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        ax.legend(fontsize=7, markerscale=2, bbox_to_anchor=(1.01, 1), loc="upper left")
        out.append(png_uri(fig))
    return out


CSS = """.montage{margin:10px 0 18px}.montage img,.pair img{margin:1px;border:1px solid #ddd}
.pair{display:inline-block;margin:6px 12px 6px 0;font-size:12px;text-align:center}"""


def _verification(v: dict | None) -> str:
    """Counts of the candidate pairs per kind and the score distribution of those removed vs kept apart."""
    if not v:
        return ""
    from cytoray.figures import figure

    rows = [[k, v[k]["candidates"], v[k]["verified"], v[k]["kept_apart"], v[k]["no_alignment"], v[k]["unverifiable"],
             v[k]["threshold"]] for k in ("near", "leakage")]
    bins = np.array(v["score_bins"])
    fig, axes = figure((9.0, 2.8), 1, 2, squeeze=False)
    for ax, k in zip(axes.flat, ("near", "leakage")):
        centres, width = (bins[:-1] + bins[1:]) / 2, bins[1] - bins[0]
        ax.bar(centres, v[k]["histogram_kept_apart"], width, color="tab:blue", alpha=0.7, label="kept apart")
        ax.bar(centres, v[k]["histogram_verified"], width, color="tab:red", alpha=0.7, label="removed (verified)")
        ax.axvline(v[k]["threshold"], color="k", lw=1, ls="--")
        ax.set_yscale("symlog")
        ax.set_title(f"{k} candidate pairs: verified score", fontsize=10)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return (table(["candidates", "pairs", "verified (removed)", "kept apart", "no alignment", "unverifiable",
                   "threshold"], rows)
            + f"<img alt='verified scores of candidate pairs' src='{png_uri(fig)}'>")


def reason_counts(counts: dict) -> str:
    """``8 exact, 38 near, 1 leakage`` from reason -> duplicates (the most first); ``none`` when empty."""
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{int(n)} {html.escape(str(reason))}" for reason, n in ordered) or "none"


def build_report(out_uri: str, cfg: ReportConfig, storage_cfg=None) -> str:
    """The report's HTML from the run directory's outputs."""
    from cytoray import storage, tables
    from cytoray.curation.cluster import load_stage_embeddings
    from cytoray.curation.stage import read_marker

    def read(name):
        return tables.read_table(storage.join_uri(out_uri, name), storage_cfg).to_pandas()

    summary = json.loads(storage.read_bytes(storage.join_uri(out_uri, "summary.json"), storage_cfg))
    balance = read_marker(out_uri, "balance", storage_cfg)
    unbalanced, dups, quarantine = read("unbalanced.parquet"), read("duplicates.parquet"), read("quarantine.parquet")
    uri_of = dict(zip(*[read("ingested.parquet")[c] for c in ("image_id", "uri")]))
    top_col = balance["top_cluster_column"]
    rng = np.random.default_rng(cfg.seed)
    parts = [f"<h1>cytoray curation report</h1><p class='note'>Run directory: {html.escape(out_uri)} &middot; "
             f"embedder {html.escape(str(summary['embedder']))} &middot; cluster levels {summary['clusters']['levels']}"
             f" &middot; groups from {html.escape(str(summary['balance']['groups_from']))}</p>"
             + RENDER_CHECK]

    # counts
    cols = ["input_files", "quarantined_files", "images", "exact_duplicates", "near_duplicates", "leakage", "kept",
            "sampled_images", "samples_per_epoch"]
    rows = [[name] + [p[c] for c in cols] for name, p in sorted(summary["datasets"].items())]
    rows.append(["total"] + [summary["total"][c] for c in cols])
    parts.append("<section id='counts'><h2>Counts per stage</h2><p class='note'>images = kept + duplicates "
                 "(exact, near, leakage); input files = kept files + quarantined files; cropped detection / "
                 "segmentation cells count as images.</p>" + table(["dataset"] + cols, rows) + "</section>")

    # balance
    metric_rows = []
    for key in ("dataset", "group", "cell_type", "cluster"):
        b, a = balance["before"][key], balance["after"][key]
        metric_rows.append([key, b["normalized_entropy"], a["normalized_entropy"], b["kl_to_uniform"],
                            a["kl_to_uniform"], b["largest_share"], a["largest_share"]])
    mix = (balance["before"]["knn_dataset_mixing"], balance["after"]["knn_dataset_mixing"])
    charts = "".join(f"<img alt='{k} before/after' src='{_bars(balance['before']['counts'][k], balance['after']['counts'][k], f'by {k}')}'>"
                     for k in ("dataset", "cell_type", "group", "cluster"))
    parts.append("<section id='balance'><h2>Before / after balancing</h2>"
                 + table(["distribution", "norm. entropy before", "after", "KL to uniform before", "after",
                           "largest share before", "after"], metric_rows)
                 + f"<p>kNN dataset mixing (1 = datasets indistinguishable in the embedding): {mix[0]} &rarr; "
                   f"{mix[1]}. Target {balance['target_size']} samples per epoch from {balance['sampled_images']} "
                   f"images, max repeat {balance['max_repeat']}, seed {balance['seed']}.</p>" + charts + "</section>")

    # cluster montages
    sizes = unbalanced[top_col].value_counts()
    mont = [f"<section id='clusters'><h2>Top-level clusters ({top_col})</h2><p class='note'>Name and weight "
            "clusters in <code>group_mapping_template.csv</code> (columns cluster, group, weight; weight 0 drops a "
            "cluster) and pass it as <code>balance.mapping_file</code>.</p>"]
    for c, size in list(sizes.items())[: cfg.max_clusters]:
        members = unbalanced[unbalanced[top_col] == c]
        pick = members.iloc[np.sort(rng.choice(len(members), min(len(members), cfg.thumbs_per_cluster), replace=False))]
        ds = ", ".join(f"{k} {v}" for k, v in members["dataset"].value_counts().head(3).items())
        ct = ", ".join(f"{k} {v}" for k, v in members["cell_type"].fillna("unlabelled").value_counts().head(3).items())
        imgs = "".join(f"<img title='{html.escape(r.image_id)}' src='{_thumb(r.uri, cfg.thumb_size, storage_cfg)}'>"
                       for r in pick.itertuples())
        mont.append(f"<div class='montage'><b>cluster {c}</b> &middot; {size} images &middot; sampled "
                    f"{int(members['repeats'].sum())}/epoch &middot; {html.escape(ds)} &middot; {html.escape(ct)}"
                    f"<br>{imgs}</div>")
    parts.append("".join(mont) + "</section>")

    # duplicate pairs
    shown = dups.sort_values(["reason", "similarity"]).groupby("reason", group_keys=False).head(
        max(1, cfg.duplicate_pairs // max(1, dups["reason"].nunique()))) if len(dups) else dups
    pairs = []
    for r in shown.itertuples():
        other = uri_of.get(r.duplicate_of)
        if other is None and r.reason == "leakage":
            other = r.duplicate_of if "://" in r.duplicate_of or r.duplicate_of.startswith("/") else None
        right = (f"<img src='{_thumb(other, cfg.thumb_size, storage_cfg)}'>" if other
                 else "<span>(evaluation image)</span>")
        how = getattr(r, "transform", None) or ""
        pairs.append(f"<div class='pair'><img src='{_thumb(uri_of[r.image_id], cfg.thumb_size, storage_cfg)}'>{right}"
                     f"<br>{html.escape(r.reason)} {r.similarity:.3f}<br>{html.escape(r.dataset)} &rarr; "
                     f"{html.escape(r.duplicate_of_dataset)}<br><span class='note'>{html.escape(how)}</span></div>")
    by_reason = reason_counts(dups["reason"].value_counts().to_dict() if len(dups) else {})
    verification = (read_marker(out_uri, "dedup", storage_cfg) or {}).get("verification")
    parts.append(f"<section id='duplicates'><h2>Duplicates ({len(dups)})</h2><p class='note'>{by_reason}. A near "
                 "duplicate or leak is a candidate pair whose images map onto each other (the transform under each "
                 "pair: flip or turn, the box of one in the other's frame, its offset) with a verified score of at "
                 "least the threshold (docs/curation.md, \"Duplicates\").</p>" + _verification(verification)
                 + "<p class='note'>The lowest-scoring removals per reason (the ones to check): removed image left, "
                   "kept or evaluation image right.</p>" + "".join(pairs) + "</section>")

    # quarantine
    q_rows = [[d, r, n] for (d, r), n in quarantine.groupby(["dataset", "reason"]).size().items()] if len(quarantine) else []
    ex = quarantine.head(cfg.quarantine_examples)
    parts.append(f"<section id='quarantine'><h2>Quarantine ({len(quarantine)} files)</h2>"
                 + table(["dataset", "reason", "files"], q_rows)
                 + table(["uri", "reason", "detail"], [[r.uri, r.reason, r.detail] for r in ex.itertuples()])
                 + "</section>")

    # embedding map
    emb = load_stage_embeddings(out_uri, unbalanced["image_id"].tolist(), None, storage_cfg)
    maps = _pca_maps(emb, unbalanced["dataset"].to_numpy(dtype=object).astype(str),
                     unbalanced["cell_type"].fillna("unlabelled").to_numpy(dtype=object).astype(str), cfg)
    parts.append("<section id='map'><h2>Embedding map</h2>" + "".join(f"<img alt='PCA map' src='{m}'>" for m in maps)
                 + "</section>")
    return page("cytoray curation report", "".join(parts), CSS)


def write_report(out_uri: str, cfg: ReportConfig, storage_cfg=None) -> dict:
    import time

    from cytoray import storage

    t0 = time.time()
    page = build_report(out_uri, cfg, storage_cfg)
    uri = storage.join_uri(out_uri, "report.html")
    storage.write_bytes(uri, page.encode(), storage_cfg)
    log.info("report: %s (%.1f MB) in %.1fs", uri, len(page) / 1e6, time.time() - t0)
    return {"uri": uri, "bytes": len(page), "images": page.count("<img"), "seconds": round(time.time() - t0, 2)}
