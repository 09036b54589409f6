"""DinoBloom-G pretraining (ViT-g/14, preset ``dinobloom_g``) on a curated manifest, as a Ray Train job.

    ray job submit --working-dir . -- python recipes/pretrain_vitg.py \
        data.manifest_uri=s3://bucket/curate/manifest.parquet run.name=dinobloom_g run.storage_path=s3://bucket/runs \
        [train.init_checkpoint=s3://bucket/dinov2_vitg14_pretrain.pth] [key=value ...]
    python recipes/pretrain.py --config recipes/configs/cpu_debug.yaml data.manifest_uri=... run.name=debug

Rerunning with the same run.name and run.storage_path resumes from the last checkpoint. Equivalent to
``python recipes/pretrain.py preset=dinobloom_g``.
"""

import sys

from pretrain import main  # recipes/pretrain.py: Python puts this script's directory on sys.path

from cytoray.console import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe(lambda argv: main(argv, preset="dinobloom_g", script="recipes/pretrain_vitg.py")))
