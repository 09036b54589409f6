"""Score curation output against a synthetic collection's ground truth."""

from __future__ import annotations


def dedup_precision_recall(duplicates: list[dict], ground_truth) -> dict:
    """Precision: share of reported (image, duplicate_of) pairs that are planted copies of each other.
    Recall: share of planted copies that end up in the same reported component as their original.

    ``ground_truth``: the collection's ground_truth table (pandas) with image_id, kind, duplicate_of.
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

    correct = 0
    for d in duplicates:
        a, b = d["image_id"], d["duplicate_of"]
        parent[find(a)] = find(b)
        correct += a in group and b in group and group[a] == group[b]
    found = sum(find(r.image_id) == find(r.duplicate_of) for r in planted.itertuples())
    by_kind = {}
    for kind in ("near_duplicate", "exact_duplicate"):
        sub = planted[planted.kind == kind]
        by_kind[kind] = sum(find(r.image_id) == find(r.duplicate_of) for r in sub.itertuples()) / max(len(sub), 1)
    return {"precision": correct / max(len(duplicates), 1), "recall": found / max(len(planted), 1),
            "reported": len(duplicates), "planted": len(planted), "recall_by_kind": by_kind}
