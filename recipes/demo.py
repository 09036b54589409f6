"""The embedded default main job (`make demo`): a synthetic collection in a local directory, curation (with a
held-out labelled evaluation set guarded against leakage), a short CPU pretraining run (tiny ViT, 2 Ray Train
workers, FSDP2 over gloo) on the curated manifest whose every checkpoint is probed on the held-out set while it
trains, then the probe table: the demo's teacher vs random init vs the handcrafted curation features, cell
types on the held-out set (linear probe, kNN; in-site and across sites) and AML subtypes of the synthetic AML Hehr
patients (ABMIL, by patient). The held-out set spans four synthetic acquisition sites (stain, illumination, blur,
resolution: ``curation/synthetic/sites.py``), so each probe is scored in-site (stratified 5-fold, every site on
both sides) and across sites (leave one site out: trained on three, scored on the fourth; mean over the four),
with the Robustness Index of each backbone's features. Synthetic data: the numbers show the machinery works, not
what real smears give.

    python recipes/demo.py [--images 1500] [--steps 300] [--out runs/demo] [key=value ...]

Trailing ``key=value`` overrides go to the pretraining run (e.g. ``model.optim.teacher_temp=0.07``), after the
demo's own settings, so one command reruns the whole comparison with another preset value.
"""

import argparse
import glob
import os
import sys

import pretrain  # recipes/pretrain.py (this script's directory is on sys.path)

from cytoray import console, tables
from cytoray.console import run_recipe
from cytoray.curation import pipeline
from cytoray.curation.synthetic.collection import CollectionSpec, generate_collection
from cytoray.eval import probe
from cytoray.eval.protocols import CrossSiteConfig
from cytoray.testing import write_site_manifest

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_IMAGES = 400  # held-out cells: 4 sites x 10 classes x 10
CROSS_SITE = "leave_one_dataset_out"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps (0: curation only)")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--seed", type=int, default=0)
    args, overrides = ap.parse_known_args(argv)
    unknown = [a for a in overrides if "=" not in a or a.startswith("-")]
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)} (pretraining overrides are key=value)")
    out = os.path.abspath(args.out)
    console.log_to(out)  # one log for the whole demo: <out>/logs/demo_<time>.log
    data_dir = os.path.join(out, "data")
    if not os.path.exists(os.path.join(data_dir, "datasets.yaml")):
        res = generate_collection(data_dir, CollectionSpec(images=args.images, seed=args.seed))
        console.say(f"synthetic collection: {sum(res['counts'].values())} files in {data_dir}")
    eval_manifest = os.path.join(out, "eval", "manifest.parquet")
    if not os.path.exists(eval_manifest):  # held-out labelled cells of 4 sites, never trained on (the leakage guard)
        write_site_manifest(os.path.dirname(eval_manifest), EVAL_IMAGES, seed=1000 + args.seed)
    curate_dir = os.path.join(out, "curate")
    pipeline.main(["--config", os.path.join(HERE, "configs", "curate.yaml"),
                   "--config", os.path.join(data_dir, "datasets.yaml"), f"output_uri={curate_dir}", "ray.num_cpus=2",
                   f"dedup.eval_manifests=[{eval_manifest}]"])
    if args.steps:
        # A rerun of the demo resumes this run (same name and storage path) and stops at the same step.
        # Every checkpoint is probed on the held-out set by a Ray task while training goes on (eval.manifests).
        pretrain.main(["--config", os.path.join(HERE, "configs", "cpu_debug.yaml"),
                       f"data.manifest_uri={os.path.join(curate_dir, 'manifest.parquet')}", "run.name=pretrain",
                       f"run.storage_path={out}", f"model.total_iters={args.steps}", "train.log_every=50",
                       f"train.checkpoint_every={max(1, args.steps // 3)}", f"train.seed={args.seed}",
                       f"train.export_every={max(1, args.steps // 3)}", f"eval.manifests=[{eval_manifest}]",
                       f"eval.probe.cross_site.protocol={CROSS_SITE}", "eval.probe.headline=cross_site",
                       *overrides], preset="debug")
        exports = sorted(glob.glob(os.path.join(out, "pretrain", "exports", "teacher_*.pth")))
        patients = patient_manifest(curate_dir, os.path.join(out, "eval", "aml_hehr_patients.parquet"))
        wait_for_cpus(1.0)  # Ray Train releases the run's workers and placement group a few seconds after fit()
        console.say("probe (balanced accuracy): cell types of 4 synthetic sites (in-site: stratified 5-fold; "
                    "cross-site: leave one site out, mean over sites) and AML Hehr subtypes (ABMIL, by patient):")
        results = compare_backbones([exports[-1], "random:vit_debug", "handcrafted"], eval_manifest, patients,
                                    os.path.join(out, "probe"))
        console.say(probe.comparison_table(results))
        console.say(f"results: {os.path.join(out, 'probe', 'results.json')} (+ patients/results.json)")
    console.say(f"curation report: {os.path.join(curate_dir, 'report.html')}")
    if args.steps:
        console.say(f"training report: {os.path.join(out, 'pretrain', 'training.html')}")
        console.say(f"training metrics: {os.path.join(out, 'pretrain', 'metrics.csv')} (+ tensorboard/)")
        console.say(f"per-checkpoint probe: {os.path.join(out, 'pretrain', 'eval', 'results.csv')}")


def compare_backbones(backbones: list[str], cells: str, patients: str, out: str) -> list[dict]:
    """Every backbone on the site manifest (in-site and leave-one-site-out) and on the AML Hehr patients (ABMIL
    in-site: they come from one dataset, so there is no site to hold out); results.json under ``out`` and
    ``out/patients``."""
    from dataclasses import replace

    cfg = probe.ProbeConfig(cache_dir=os.path.join(out, "cache"), cross_site=CrossSiteConfig(protocol=CROSS_SITE))
    with console.stage("probe features"):
        results = probe.run_probe(backbones, [cells], cfg, out)
        results += probe.run_probe(backbones, [patients], replace(cfg, mil=True, cross_site=CrossSiteConfig()),
                                   os.path.join(out, "patients"))
    return results


def wait_for_cpus(need: float, timeout_s: float = 120.0) -> None:
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while ray.is_initialized() and ray.available_resources().get("CPU", 0.0) < need and time.monotonic() < deadline:
        time.sleep(1.0)


def patient_manifest(curate_dir: str, out: str) -> str:
    """The curated AML Hehr cells with their patients' subtype labels (no cell labels), for ABMIL. The cells
    are in the self-supervised pretraining data (as AML Hehr is in DinoBloom's); the labels never are."""
    import pyarrow.compute as pc

    table = tables.read_table(os.path.join(curate_dir, "unbalanced.parquet"))
    hehr = table.filter(pc.equal(table["dataset"], "aml_hehr")).select(
        ["image_id", "uri", "patient_id", "patient_label"])
    tables.write_table(out, hehr, sort=False)
    return out


if __name__ == "__main__":
    sys.exit(run_recipe(main))
