"""A labelled manifest (held-out set) from class folders or a label table: ingest with quarantine, exact copies
removed, no balancing. The probe (--manifest) and the leakage guard (dedup.eval_manifests) read it.

    python recipes/manifest.py --dataset data/heldout --out runs/heldout
    python recipes/manifest.py --dataset data/heldout/labels.csv --out runs/heldout   # uri,label[,patient_id,split]
    python recipes/manifest.py --config my_datasets.yaml --out s3://bucket/heldout      # any layout, several sets
    python recipes/probe.py --checkpoint ... --manifest runs/heldout/manifest.parquet

Relative paths are made absolute against the working directory; see docs/evaluation.md.
"""

import sys

from cytoray.console import run_recipe
from cytoray.curation.labelled import main

if __name__ == "__main__":
    sys.exit(run_recipe(main))
