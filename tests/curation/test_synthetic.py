import hashlib
import os

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from cytoray.curation.synthetic.cells import CLASS_NAMES, Stain, render_cell
from cytoray.curation.synthetic.collection import NEAR_TRANSFORMS, CollectionSpec, generate_collection
from cytoray.curation.synthetic.layouts import STYLES


def _tree_digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f == "datasets.yaml":
                continue  # holds absolute paths
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, root).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    spec = CollectionSpec(images=120, seed=7, workers=1)
    a = generate_collection(str(tmp_path / "a"), spec)
    b = generate_collection(str(tmp_path / "b"), CollectionSpec(images=120, seed=7, workers=2))
    assert a["counts"] == b["counts"]
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    generate_collection(str(tmp_path / "c"), CollectionSpec(images=120, seed=8, workers=1))
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_size_is_configurable(tmp_path):
    small = generate_collection(str(tmp_path / "s"), CollectionSpec(images=60, seed=1, workers=1))
    large = generate_collection(str(tmp_path / "l"), CollectionSpec(images=600, seed=1, workers=2))
    assert 5 * small["counts"]["original"] < large["counts"]["original"]


def _features(img):
    small = np.asarray(Image.fromarray(img).resize((24, 24), Image.BILINEAR), np.float32) / 255
    return small.reshape(-1)


def test_classes_are_learnable_by_a_tiny_classifier():
    rng = np.random.default_rng(3)
    X, y = [], []
    for label, cls in enumerate(CLASS_NAMES):
        for _ in range(30):
            X.append(_features(render_cell(cls, 64, 0.35, Stain(), rng)))
            y.append(label)
    acc = cross_val_score(LogisticRegression(max_iter=2000), np.array(X), np.array(y), cv=3).mean()
    assert acc > 0.8, acc  # chance is 1/14


def test_sources_differ_in_stain_and_size():
    rng = np.random.default_rng(0)
    means = {}
    for name in ("acevedo", "matek", "bmc", "lisc"):
        st = STYLES[name]
        img = np.stack([render_cell("lymphocyte", 64, 0.3, st.stain, rng) for _ in range(8)])
        means[name] = img.reshape(-1, 3).mean(0)
    spread = np.ptp(np.stack(list(means.values())), axis=0).max()
    assert spread > 4, means  # per-source stain shift is visible in mean colour
    assert len({(s.width, s.height) for s in STYLES.values()}) >= 6
    assert {s.fmt for s in STYLES.values()} >= {"jpg", "tiff", "bmp", "png"}


def test_ground_truth_lists_planted_files(collection, ground_truth):
    root = collection["root"]
    kinds = ground_truth["kind"].value_counts().to_dict()
    assert kinds["near_duplicate"] > 0 and kinds["exact_duplicate"] > 0 and kinds["bad"] > 0 and kinds["crop"] > 0
    dups = ground_truth[ground_truth.kind.str.endswith("duplicate")]
    assert (dups.duplicate_of.str.split("/").str[0] != dups.dataset).any()  # some cross-dataset copies
    assert (dups.duplicate_of.str.split("/").str[0] == dups.dataset).any()  # and some within
    assert set(dups[dups.kind == "near_duplicate"]["transform"]) <= set(NEAR_TRANSFORMS)
    for row in ground_truth[ground_truth.kind != "crop"].itertuples():
        assert os.path.exists(os.path.join(root, row.dataset, row.relpath)), row
    bad = ground_truth[ground_truth.kind == "bad"]
    assert set(bad.expected_reason) == {"empty_file", "truncated", "not_an_image", "too_small", "too_large"}
    assert set(bad.dataset) == {d["name"] for d in collection["datasets"]}


def test_exact_duplicates_have_identical_decoded_pixels(collection, ground_truth):
    from cytoray.images import decode

    root = collection["root"]
    exact = ground_truth[ground_truth.kind == "exact_duplicate"]
    assert len(exact)
    for row in exact.itertuples():
        a = decode(open(os.path.join(root, row.dataset, row.relpath), "rb").read()).rgb
        b = decode(open(os.path.join(root, row.duplicate_of), "rb").read()).rgb
        assert np.array_equal(a, b)


def test_published_layout_paths(collection):
    root = collection["root"]
    expect = {
        "acevedo": "PBC_dataset_normal_DIB/neutrophil", "matek": "AML-Cytomorphology_LMU/NGS",
        "bmc": "BM_cytomorphology_data/NGS/0001-1000", "raabin": "Train/Neutrophil",
        "lisc": "LISC Database/Main Dataset/neut", "aml_hehr": "metadata.csv", "apl_aml": "master.csv",
        "bccd": "BCCD/Annotations", "segpc": "train/y", "table_set": "labels.csv",
    }
    for name, rel in expect.items():
        assert os.path.exists(os.path.join(root, name, rel)), (name, rel)
    gt = pq.read_table(collection["ground_truth"]).to_pandas()
    hehr = gt[(gt.dataset == "aml_hehr") & (gt.kind == "original")]
    assert hehr.patient_id.nunique() >= 10 and hehr.patient_label.nunique() == 5
