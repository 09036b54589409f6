"""Curation-only run: ingest, embed, dedup, cluster and balance a list of datasets into a balanced manifest + report.

    python recipes/curate.py --config recipes/configs/curate.yaml output_uri=runs/curate \
        [--config my_datasets.yaml] [ingest.batch_size=64 ...]
    ray job submit --working-dir . -- python recipes/curate.py --config ... output_uri=s3://bucket/run

Datasets come from a yaml file with a `datasets:` list (name, layout, uri, modality, options).
"""

import sys

from cytoray.console import run_recipe
from cytoray.curation.pipeline import main

if __name__ == "__main__":
    sys.exit(run_recipe(main))
