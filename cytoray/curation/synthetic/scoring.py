"""Score curation output against a synthetic collection's ground truth."""

from __future__ import annotations

from collections import defaultdict


def dedup_precision_recall(duplicates: list[dict], ground_truth) -> dict:
    """Precision: share of reported (image, duplicate_of) pairs that are planted copies of each other.
    Recall: share of planted copies that end up in the same reported component as their original (``missed``: the
    image ids of those that do not).

    ``ground_truth``: a ground-truth table (pandas) with image_id, kind, duplicate_of; optional ``transform``
    (recall per kind of copy) and ``cell_type`` (distinct cells removed per class: every row that is not a planted
    copy — originals and look-alikes — counts as a distinct cell; one removed for a pair that is not a planted copy is
    a false removal). ``duplicates``: rows of duplicates.parquet (leakage rows are scored by ``leakage_scores``).
    """
    planted = ground_truth[ground_truth.kind.isin(["near_duplicate", "exact_duplicate"])]
    group = {}
    for row in planted.itertuples():
        group[row.image_id] = row.duplicate_of
        group.setdefault(row.duplicate_of, row.duplicate_of)
    parent: dict[str, str] = {}

    def find(a):
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    correct, wrong = 0, []
    for d in duplicates:
        a, b = d["image_id"], d["duplicate_of"]
        parent[find(a)] = find(b)
        ok = a in group and b in group and group[a] == group[b]
        correct += ok
        if not ok:
            wrong.append(a)
    found = {r.image_id: find(r.image_id) == find(r.duplicate_of) for r in planted.itertuples()}
    by_kind = {}
    for kind in ("near_duplicate", "exact_duplicate"):
        sub = planted[planted.kind == kind]
        by_kind[kind] = sum(found[r] for r in sub.image_id) / max(len(sub), 1)
    out = {"precision": correct / max(len(duplicates), 1), "recall": sum(found.values()) / max(len(planted), 1),
           "reported": len(duplicates), "planted": len(planted), "recall_by_kind": by_kind, "false_removals": len(wrong),
           "missed": sorted(k for k, ok in found.items() if not ok)}
    if "transform" in planted.columns:
        per = defaultdict(list)
        for r in planted.itertuples():
            per[r.transform].append(found[r.image_id])
        out["recall_by_transform"] = {k: sum(v) / len(v) for k, v in sorted(per.items())}
    if "cell_type" in ground_truth.columns:
        distinct = ground_truth[~ground_truth.kind.isin(["near_duplicate", "exact_duplicate"])]
        cells = distinct.groupby("cell_type").size()
        lost = defaultdict(int)
        cls = dict(zip(distinct.image_id, distinct.cell_type))
        for a in wrong:
            if a in cls:
                lost[cls[a]] += 1
        out["distinct_lost_by_class"] = {c: lost[c] / n for c, n in cells.items()}
        if "lookalike_of" in ground_truth.columns:
            looks = ground_truth[ground_truth.kind == "lookalike"]
            removed = {d["image_id"]: d["duplicate_of"] for d in duplicates}
            hit = sum(removed.get(r.image_id) == r.lookalike_of or removed.get(r.lookalike_of) == r.image_id
                      for r in looks.itertuples())
            out["lookalike_pairs"] = len(looks)
            out["lookalike_pairs_removed"] = hit
    return out


def leakage_scores(duplicates: list[dict], ground_truth, eval_ids: set[str]) -> dict:
    """The leakage guard against evaluation images that are originals of the collection (their ids): flagged
    training images, and how many of them are the evaluation images themselves, their planted copies, or unrelated
    (including their look-alikes)."""
    copies = ground_truth[ground_truth.kind.isin(["near_duplicate", "exact_duplicate"])]
    source = dict(zip(copies.image_id, copies.duplicate_of))
    planted = {i for i, s in source.items() if s in eval_ids}
    flagged = [d for d in duplicates if d["reason"] == "leakage"]
    self_hits = sum(d["image_id"] == d["duplicate_of"] for d in flagged)
    copy_hits = sum(d["image_id"] in planted and source[d["image_id"]] == d["duplicate_of"] for d in flagged)
    return {"flagged": len(flagged), "evaluation_images": len(eval_ids), "self": self_hits,
            "planted_copies": len(planted), "planted_copies_flagged": copy_hits,
            "unrelated": len(flagged) - self_hits - copy_hits}
