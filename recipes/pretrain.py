"""DINOv2 pretraining on a curated manifest as a Ray Train job; ``preset=`` picks the model (default dinobloom_l).

    ray job submit --working-dir . -- python recipes/pretrain.py preset=dinobloom_b \
        data.manifest_uri=s3://bucket/curate/manifest.parquet run.name=dinobloom_b run.storage_path=s3://bucket/runs \
        [train.init_checkpoint=s3://bucket/dinov2_vitb14_pretrain.pth] [key=value ...]
    python recipes/pretrain.py --config recipes/configs/cpu_debug.yaml data.manifest_uri=... run.name=debug

Presets: cytoray/configs/*.yaml (dinobloom_s/b/l/g, debug); recipes/pretrain_vit{s,b,l,g}.py are this script
for one preset each (a preset= in argv or a --config file still wins there, with a one-line warning). Config
layers: schema <- preset <- --config files <- key=value. Rerunning with the same run.name and run.storage_path
resumes from the last checkpoint.
"""

import logging
import sys

from cytoray import config, console, storage
from cytoray.console import run_recipe
from cytoray.eval import validation
from cytoray.platform.config import chosen_preset, load_pretrain_config, preset_replaced
from cytoray.platform.train import pretrain, run_uri
from cytoray.runtime import setup_logging


def main(argv: list[str], preset: str = "dinobloom_l", script: str | None = None):
    """``script``: the pretrain_vit* entry point that stands for ``preset``; it warns when argv replaces it."""
    cfg = load_pretrain_config(argv, preset)  # preset=... in argv or a --config file wins over `preset`
    setup_logging(cfg.log_level)
    if script and (replaced := preset_replaced(script, preset, *chosen_preset(argv, preset))):
        logging.getLogger("cytoray.recipes").warning(replaced)
    result = pretrain(cfg)  # Ray Train: FSDP2 workers stream the manifest; every checkpoint is probed
    if result.error is not None:
        raise result.error
    cfg = config.to_object(cfg)
    run = run_uri(cfg)
    last = result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1] if result.checkpoint else "no checkpoint"
    console.say(f"run: {run}  ({last}; training.html, metrics.csv, tensorboard/, exports/)")
    final = storage.join_uri(run, "exports", "final")
    if cfg.train.final_export and storage.exists(storage.join_uri(final, cfg.train.final_export[0]), cfg.storage):
        console.say(f"export: {final}/{{{','.join(cfg.train.final_export)}}} (each with a model card, README.md)")
    rows = validation.read_results_table(run, cfg.storage)
    if rows:
        console.say(f"probe of every scored checkpoint (balanced accuracy; all metrics in "
                    f"{storage.join_uri(run, validation.EVAL_DIR, validation.RESULTS_CSV)}):")
        console.say(validation.format_results_table(rows))
    return result


if __name__ == "__main__":
    sys.exit(run_recipe(main))
