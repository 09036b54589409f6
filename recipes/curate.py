"""Curation-only run: ingest (and, as they land, dedup / cluster / balance) a list of datasets.

    python recipes/curate.py --config recipes/configs/curate.yaml output_uri=runs/curate \
        [--config my_datasets.yaml] [ingest.batch_size=64 ...]
    ray job submit --working-dir . -- python recipes/curate.py --config ... output_uri=s3://bucket/run

Datasets come from a yaml file with a `datasets:` list (name, layout, uri, modality, options).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cytoray.curation.pipeline import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
