"""Shared fixtures: one real local Ray instance, one synthetic collection, one local S3 endpoint."""

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

SEED = 123  # tests use a different seed from the one thresholds were tuned on (0)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def collection(tmp_path_factory):
    """A small synthetic collection in every layout, with planted duplicates and bad files."""
    from cytoray.curation.synthetic.collection import CollectionSpec, generate_collection

    root = tmp_path_factory.mktemp("collection")
    res = generate_collection(str(root), CollectionSpec(images=350, seed=SEED, workers=1))
    res["root"] = str(root)
    return res


@pytest.fixture(scope="session")
def ground_truth(collection):
    import pyarrow.parquet as pq

    return pq.read_table(collection["ground_truth"]).to_pandas()


@pytest.fixture(scope="session")
def s3():
    from cytoray.testing import local_s3

    with local_s3() as cfg:
        yield cfg
