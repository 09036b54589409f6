"""The embedded default main job (`make demo`): a synthetic collection in a local directory, then curation.

    python recipes/demo.py [--images 1500] [--out runs/demo]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cytoray.curation import pipeline  # noqa: E402
from cytoray.curation.synthetic.collection import CollectionSpec, generate_collection  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data_dir = os.path.abspath(os.path.join(args.out, "data"))
    if not os.path.exists(os.path.join(data_dir, "datasets.yaml")):
        res = generate_collection(data_dir, CollectionSpec(images=args.images, seed=args.seed))
        print(f"synthetic collection: {sum(res['counts'].values())} ground-truth rows {res['counts']} in {data_dir}")
    pipeline.main(["--config", os.path.join(HERE, "configs", "curate.yaml"),
                   "--config", os.path.join(data_dir, "datasets.yaml"),
                   f"output_uri={os.path.abspath(os.path.join(args.out, 'curate'))}", "ray.num_cpus=2"])


if __name__ == "__main__":
    main()
