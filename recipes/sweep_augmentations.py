"""Ray Tune sweep of augmentation settings: each trial a short pretraining run (a Ray Train job inside a Tune
function trainable), scored by the probe's balanced accuracy on held-out labelled manifests, ASHA early stopping.
Writes <sweep.storage_path>/<sweep.name>/{results.csv, scores.png, best_overrides.yaml, best.json}.

    ray job submit --working-dir . -- python recipes/sweep_augmentations.py \
        data.manifest_uri=s3://bucket/curate/manifest.parquet eval.manifests=[s3://bucket/eval/acevedo.parquet] \
        sweep.storage_path=s3://bucket/sweeps sweep.name=aug1 sweep.num_samples=16 sweep.rungs=[500,1000,2000]
    # laptop / CI (tiny ViT on CPU, two trials at once on 2 CPUs):
    python recipes/sweep_augmentations.py --config recipes/configs/cpu_debug.yaml \
        --config recipes/configs/sweep_cpu.yaml data.manifest_uri=... eval.manifests=[...]

Scored across sites (what stain augmentation is for; eval.manifests spanning sites in a ``dataset`` column):
    eval.probe.headline=cross_site eval.probe.cross_site.protocol=leave_one_dataset_out

Knobs: sweep.knobs=[global_crop_scale,local_crop_scale,jitter_strength,stain,local_crops,rotation_flip,reinhard],
values in sweep.space.<knob>=[...]. The preset (default dinobloom_s) is the base every trial starts from.
"""

import sys

from cytoray.console import run_recipe
from cytoray.platform.sweep import main

if __name__ == "__main__":
    sys.exit(run_recipe(lambda argv: main(argv, preset="dinobloom_s")))
