"""Cost of copy verification per candidate pair, against an earlier revision of the verifier in the same process.

Renders a planted collection (``cytoray.curation.synthetic.planted.make_collection``: copies of every kind,
look-alikes), fingerprints it as the embed stage does, takes the candidate pairs the in-memory search proposes
(``dedup.candidate_pairs``), and verifies the same pairs (sorted by image, as a stage's verification group holds
them) with this checkout's ``curation/verification.py`` and with the file as it was at ``--baseline-rev`` (read
with ``git show``), alternately, ``--repeats`` times each, on one torch thread (a verification task's share of a
core). Prints CPU milliseconds per pair of both and their ratio, and how far the two agree: decisions at
``dedup.threshold`` and ``dedup.leakage_threshold``, pairs whose scores differ by more than 0.01 and the highest
score among them.

    python benchmarks/verify_cost.py                          # 20,000 images, ~1.5 min to render on 2 cores
    python benchmarks/verify_cost.py --baseline-rev 02fb364 --images 20000 --pairs 16384
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cytoray.curation import dedup as D  # noqa: E402
from cytoray.curation import verification as V  # noqa: E402
from cytoray.curation.synthetic import planted as P  # noqa: E402
from cytoray.features.fingerprint import fingerprints_of_table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_revision(rev: str):
    """``cytoray/curation/verification.py`` as it was at ``rev``, imported as a module of its own."""
    text = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:cytoray/curation/verification.py"], check=True,
                          capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f"verification_{rev}.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location(f"verification_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--pairs", type=int, default=16_384, help="candidate pairs verified (the first, by image)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--baseline-rev", default="02fb364", help="git revision of the verifier to compare with")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    _, embeddings, _ = P.make_collection(args.images, 8, 0.05, seed=args.seed)
    prints = fingerprints_of_table(embeddings)
    cfg = D.DedupConfig()
    a, b, _, _ = D.candidate_pairs(prints["views"], cfg)
    order = np.lexsort((b, a))[:args.pairs]
    a, b = a[order], b[order]
    sides = prints["size"].min(1).astype(np.float64)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} on 1 thread; {args.images:,} images "
          f"(seed {args.seed}) rendered and searched in {time.perf_counter() - t0:.0f}s; verifying {len(a):,} of "
          f"their candidate pairs")
    versions = {f"baseline {args.baseline_rev}": load_revision(args.baseline_rev), "this checkout": V}
    cpu = {name: [] for name in versions}
    out = {}
    for _ in range(args.repeats):
        for name, module in versions.items():
            t = time.process_time()
            out[name] = module.verify_pairs(prints, sides, a, b)[0]
            cpu[name].append(time.process_time() - t)
    per_pair = {name: 1e3 * min(v) / len(a) for name, v in cpu.items()}
    for name, ms in per_pair.items():
        print(f"{name}: {ms:.3f} ms per pair (CPU, best of {args.repeats})")
    (old_name, old), (new_name, new) = out.items()
    print(f"ratio: {per_pair[new_name] / per_pair[old_name]:.2f}x the baseline's time")
    for label, thr in (("dedup.threshold", cfg.threshold), ("dedup.leakage_threshold", cfg.leakage_threshold)):
        print(f"decisions at {label} {thr}: {int((old >= thr).sum())} vs {int((new >= thr).sum())} pairs, "
              f"{int(((old >= thr) != (new >= thr)).sum())} differ")
    differ = np.abs(np.nan_to_num(old, nan=9.0) - np.nan_to_num(new, nan=9.0)) > 0.01
    high = np.nanmax(np.maximum(old[differ], new[differ])) if differ.any() else float("nan")
    print(f"scores differing by more than 0.01: {int(differ.sum())} of {len(a):,} pairs, highest of them {high:.3f}")


if __name__ == "__main__":
    main()
