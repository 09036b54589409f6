"""Export a backbone for transformers, timm and DinoBloom, each folder with a model card (README.md).

    python recipes/export.py --checkpoint runs/demo/pretrain/exports/teacher_00000300.pth --out runs/demo/export \
        [--format hf|timm|dinobloom ...] [--run runs/demo/pretrain] [--overwrite] [storage.endpoint_url=...]
    python recipes/export.py --run runs/demo/pretrain    # the run's final checkpoint -> <run>/exports/final

A checkpoint is anything the probe reads: a cytoray training checkpoint directory or export, a DINOv2 hub or
DinoBloom file. Writes <out>/<format>/ per format and prints one line per folder; see docs/export.md.
"""

import sys

from cytoray.console import run_recipe
from cytoray.export.exporter import main

if __name__ == "__main__":
    sys.exit(run_recipe(main))
