"""Object storage for real: moto's S3 server on 127.0.0.1, the same code path users take to AWS."""

import dataclasses
import json

import pyarrow.parquet as pq
import pytest

from cytoray import config, storage
from cytoray.curation import pipeline
from cytoray.curation.ingest import DatasetSpec, run_ingest
from cytoray.testing import FlakyProxy, upload_dir

SUBSET = ("matek", "bccd", "segpc", "aml_hehr", "table_set", "private")


@pytest.fixture(scope="module")
def s3_collection(s3, collection):
    specs = []
    for d in collection["datasets"]:
        if d["name"] in SUBSET:
            uri = f"s3://cytoray-test/collection/{d['name']}"
            upload_dir(d["uri"], uri, s3)
            specs.append(DatasetSpec(d["name"], d["layout"], uri, d["modality"]))
    return specs


def _manifest(uri, cfg):
    from cytoray.tables import read_table

    return read_table(uri, cfg).to_pandas()  # a file or a directory of part files


def _local_baseline(ray_local, collection, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("local"))
    specs = [DatasetSpec(**d) for d in collection["datasets"] if d["name"] in SUBSET]
    return run_ingest(specs, out), out


def test_ingest_from_and_to_s3_matches_local(ray_local, s3, s3_collection, collection, tmp_path_factory):
    local_summary, local_out = _local_baseline(ray_local, collection, tmp_path_factory)
    summary = run_ingest(s3_collection, "s3://cytoray-test/runs/direct", storage_cfg=s3)
    assert summary["total"] == local_summary["total"]
    m = _manifest("s3://cytoray-test/runs/direct/ingested.parquet", s3)
    local = pq.read_table(f"{local_out}/ingested.parquet").to_pandas()
    assert sorted(m.image_id) == sorted(local.image_id)
    assert (m.sort_values("image_id").pixel_sha256.values == local.sort_values("image_id").pixel_sha256.values).all()
    assert m.uri.str.startswith("s3://cytoray-test/").all()
    crops = m[m.crop_box.notna()]
    fs, _ = storage.filesystem("s3://cytoray-test", s3)
    assert len(crops) and all(fs.exists(u) for u in crops.uri)  # crops written to the bucket
    assert storage.exists("s3://cytoray-test/runs/direct/_stages/ingest.json", s3)


def test_transient_s3_failures_are_retried_and_nothing_is_lost(ray_local, s3, s3_collection):
    with FlakyProxy(s3.endpoint_url, fail_every=10) as proxy:
        flaky = dataclasses.replace(s3, endpoint_url=proxy.endpoint)
        summary = run_ingest(s3_collection, "s3://cytoray-test/runs/flaky", storage_cfg=flaky)
    assert proxy.requests > 100, proxy.requests
    print(f"flaky proxy: {proxy.requests} requests, injected {proxy.injected}")
    assert all(n > 0 for n in proxy.injected.values()), proxy.injected  # 503s, 500s and dropped connections
    direct = json.loads(storage.read_bytes("s3://cytoray-test/runs/direct/summary.json", s3))
    assert summary["total"] == direct["total"]
    for d in summary["datasets"].values():
        assert "unreadable" not in d["quarantine_reasons"]  # no failure leaked into quarantine
    a = _manifest("s3://cytoray-test/runs/flaky/ingested.parquet", s3)
    b = _manifest("s3://cytoray-test/runs/direct/ingested.parquet", s3)
    assert sorted(a.image_id) == sorted(b.image_id)


def test_curate_recipe_over_s3_never_writes_credentials(ray_local, s3, s3_collection, tmp_path):
    import yaml

    ds_file = tmp_path / "datasets.yaml"
    ds_file.write_text(yaml.safe_dump({"datasets": [dataclasses.asdict(s) for s in s3_collection[:2]]}))
    overrides = ["output_uri=s3://cytoray-test/runs/recipe", f"storage.endpoint_url={s3.endpoint_url}",
                 "storage.region=us-east-1", f"storage.access_key_id={s3.access_key_id}",
                 "scale.mode=ray", "scale.shard_rows=60",  # stage outputs as part files on object storage
                 f"storage.secret_access_key={s3.secret_access_key}"]
    results = pipeline.main(["--config", "recipes/configs/curate.yaml", "--config", str(ds_file), *overrides])
    assert results["ingest"]["total"]["kept_images"] > 0
    fs, _ = storage.filesystem("s3://cytoray-test", s3)
    # the whole curation ran against object storage: every output lands there and reconciles
    for name in ("manifest.parquet", "unbalanced.parquet", "duplicates.parquet", "quarantine.parquet",
                 "summary.json", "report.html", "group_mapping_template.csv", "clusters.parquet"):
        assert fs.exists(f"cytoray-test/runs/recipe/{name}"), name
    summary = json.loads(fs.cat_file("cytoray-test/runs/recipe/summary.json"))
    t = summary["total"]
    assert t["images"] == t["kept"] + t["duplicates"] and t["input_files"] == t["kept_files"] + t["quarantined_files"]
    assert len(_manifest("s3://cytoray-test/runs/recipe/manifest.parquet", s3)) == t["sampled_images"] > 0
    assert fs.cat_file("cytoray-test/runs/recipe/report.html").count(b"data:image/") >= 6
    for path in fs.find("cytoray-test/runs/recipe"):
        if path.endswith((".yaml", ".json")):
            text = fs.cat_file(path).decode()
            assert s3.secret_access_key not in text and s3.access_key_id not in text, path
    saved = yaml.safe_load(fs.cat_file("cytoray-test/runs/recipe/config.yaml"))
    assert saved["storage"]["secret_access_key"] == "***" and saved["storage"]["endpoint_url"] == s3.endpoint_url
    with pytest.raises(config.ConfigError, match="storage.endpointurl"):
        pipeline.main(["--config", "recipes/configs/curate.yaml", "output_uri=/tmp/x", "storage.endpointurl=y"])


def test_whole_curation_through_failing_proxy_matches_fault_free_run(ray_local, s3, tmp_path):
    """Every stage (ingest -> balance) against an endpoint that fails every 10th request (503 / 500 / dropped
    connection) publishes exactly what a run without faults publishes."""
    from cytoray.curation.pipeline import CurateConfig, run_curation
    from cytoray.curation.report import ReportConfig
    from cytoray.curation.synthetic.collection import DEFAULT_DATASETS, CollectionSpec, generate_collection

    # a few dozen images: cells in a folder layout, fields cropped at ingest, a table layout; duplicates, bad files
    small = {k: DEFAULT_DATASETS[k] for k in ("matek", "bccd", "table_set")}
    res = generate_collection(str(tmp_path), CollectionSpec(images=30, seed=5, workers=1, bad_files_per_dataset=1,
                                                            near_duplicate_rate=0.2), small)
    specs = []
    for d in res["datasets"]:
        uri = f"s3://cytoray-test/small/{d['name']}"
        upload_dir(d["uri"], uri, s3)
        specs.append(DatasetSpec(d["name"], d["layout"], uri, d["modality"]))

    def curate(name, storage_cfg):
        return run_curation(CurateConfig(output_uri=f"s3://cytoray-test/runs/{name}", datasets=specs,
                                         storage=storage_cfg, report=ReportConfig(enabled=False)))

    clean = curate("clean", s3)
    with FlakyProxy(s3.endpoint_url, fail_every=10) as proxy:
        flaky = curate("flaky", dataclasses.replace(s3, endpoint_url=proxy.endpoint))
    assert all(n > 0 for n in proxy.injected.values()), proxy.injected
    t = clean["summary"]["total"]
    assert t["duplicates"] > 0 and t["quarantined_files"] > 0 and t["cropped_cells"] > 0 and t["sampled_images"] > 0
    assert flaky["summary"]["total"] == t
    for name in ("ingested.parquet", "quarantine.parquet", "embeddings.parquet", "duplicates.parquet",
                 "clusters.parquet", "unbalanced.parquet", "manifest.parquet"):
        a = _manifest(f"s3://cytoray-test/runs/clean/{name}", s3)
        b = _manifest(f"s3://cytoray-test/runs/flaky/{name}", s3)
        if "uri" in b:  # cells cropped at ingest are written into the run directory
            b["uri"] = b.uri.str.replace("/runs/flaky/", "/runs/clean/", regex=False)
        assert a.to_json() == b.to_json(), name
