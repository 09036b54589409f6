"""Score checkpoints on labelled manifests: linear probe, kNN (and ABMIL with --mil), as a DinoBloom-style table.

    python recipes/probe.py --checkpoint runs/demo/pretrain/exports/teacher_00000300.pth \
        --checkpoint random:vit_debug --checkpoint handcrafted --manifest runs/demo/eval/manifest.parquet \
        [--out runs/demo/probe] [probe.folds=5 probe.cls_and_patch=true ...]
    ray job submit --working-dir . -- python recipes/probe.py --checkpoint s3://... --manifest s3://...

A checkpoint is a DINOv2 / DinoBloom / cytoray file, ``random:<arch>`` (random init) or ``handcrafted``
(the curation features). Writes ``results.json`` and one confusion-matrix PNG per (checkpoint, manifest)
under --out, and prints the table; every row names its checkpoint and manifest. Across sites (a manifest whose
``dataset`` column spans sites): ``probe.cross_site.protocol=leave_one_dataset_out`` (or ``explicit`` with
``probe.cross_site.train_datasets=[...]``) adds per-held-out-site rows and the Robustness Index (docs/evaluation.md).
"""

import sys

from cytoray.console import run_recipe
from cytoray.eval.probe import main

if __name__ == "__main__":
    sys.exit(run_recipe(main))
