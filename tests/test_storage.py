import os

import botocore.exceptions
import pytest

from cytoray import storage


def test_split_protocol_and_join():
    assert storage.split_protocol("s3://b/k/x.png") == ("s3", "b/k/x.png")
    assert storage.split_protocol("file:///tmp/a") == ("file", "/tmp/a")
    assert storage.split_protocol("rel/dir")[1] == os.path.abspath("rel/dir")
    assert storage.join_uri("s3://b/run/", "/crops", "x.png") == "s3://b/run/crops/x.png"


def test_unknown_scheme_names_the_fix():
    with pytest.raises(ValueError, match="nosuchfs://.*install the fsspec backend"):
        storage.filesystem("nosuchfs://bucket/key")


def test_s3_options_come_from_config_or_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    fs, path = storage.filesystem("s3://bucket/prefix", storage.StorageConfig())
    assert path == "bucket/prefix"
    assert fs.endpoint_url == "http://127.0.0.1:9"
    assert fs.client_kwargs["region_name"] == "eu-central-1"
    fs2, _ = storage.filesystem("s3://bucket", storage.StorageConfig(endpoint_url="http://127.0.0.1:7", max_attempts=3))
    assert fs2.endpoint_url == "http://127.0.0.1:7"
    assert fs2.config_kwargs["retries"] == {"max_attempts": 3, "mode": "standard"}


def _client_error(status, code):
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("exc,transient", [
    (TimeoutError("read timed out"), True),
    (ConnectionResetError(), True),
    (_client_error(503, "SlowDown"), True),
    (_client_error(500, "InternalError"), True),
    (_client_error(400, "Throttling"), True),
    (_client_error(404, "NoSuchKey"), False),
    (_client_error(403, "AccessDenied"), False),
    (FileNotFoundError("s3://b/k"), False),
])
def test_is_transient(exc, transient):
    assert storage.is_transient(exc) is transient
    wrapped = OSError("wrapped")
    wrapped.__cause__ = exc
    assert storage.is_transient(wrapped) is transient


def test_with_retries_retries_transient_then_succeeds_and_is_bounded():
    cfg = storage.StorageConfig(max_attempts=4, base_delay_s=0.001, max_delay_s=0.002)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _client_error(503, "SlowDown")
        return "ok"

    assert storage.with_retries(flaky, cfg) == "ok" and len(calls) == 3
    calls.clear()

    def always():
        calls.append(1)
        raise TimeoutError("timed out")

    from cytoray.errors import StorageError

    cfg.endpoint_url = "http://127.0.0.1:9"
    with pytest.raises(StorageError, match=r"read s3://b/k failed 4 times \(TimeoutError: timed out\) at "
                                           r"http://127.0.0.1:9; .*storage.max_attempts=4") as err:
        storage.with_retries(always, cfg, "read s3://b/k")
    assert len(calls) == 4 and isinstance(err.value.__cause__, TimeoutError)  # bounded by max_attempts
    assert isinstance(err.value, OSError)  # ingest quarantines unreadable inputs by catching OSError


def test_with_retries_does_not_retry_permanent_errors():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing, storage.StorageConfig(max_attempts=5))
    assert len(calls) == 1


def test_local_write_is_atomic_and_readable(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello" and storage.exists(uri)
    assert [p for p in os.listdir(tmp_path / "a")] == ["b.bin"]  # no temp files left behind


def test_redact():
    data = {"storage": {"secret_access_key": "s", "access_key_id": "a", "session_token": "t", "region": "r",
                        "endpoint_url": "http://x"}, "keep": [{"password": "p"}], "monkey_count": 3}
    red = storage.redact(data)
    assert red["storage"] == {"secret_access_key": "***", "access_key_id": "***", "session_token": "***",
                              "region": "r", "endpoint_url": "http://x"}
    assert red["keep"] == [{"password": "***"}] and red["monkey_count"] == 3



def test_flaky_proxy_answers_head_as_s3_does(s3):
    """HEAD carries the object's size, an injected HEAD error has no body (so the connection stays usable), and
    pyarrow and s3fs, which size objects with HEAD, see the real size through the proxy even when HEADs fail."""
    import dataclasses
    import http.client

    import boto3

    from cytoray.testing import FlakyProxy

    storage.write_bytes("s3://cytoray-test/proxy/a.bin", b"x" * 1234, s3)
    with FlakyProxy(s3.endpoint_url, fail_every=2) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.endpoint, region_name=s3.region,
                              aws_access_key_id=s3.access_key_id, aws_secret_access_key=s3.secret_access_key)
        url = {m: client.generate_presigned_url(op, Params={"Bucket": "cytoray-test", "Key": "proxy/a.bin"})
               for m, op in (("HEAD", "head_object"), ("GET", "get_object"))}
        conn = http.client.HTTPConnection(proxy.endpoint.removeprefix("http://"), timeout=10)
        statuses = []
        for method in ("HEAD", "HEAD", "GET"):  # the 2nd request fails; all three share one connection
            conn.request(method, url[method].removeprefix(proxy.endpoint))
            resp = conn.getresponse()
            body = resp.read()
            statuses.append(resp.status)
            if resp.status == 200:
                assert resp.getheader("Content-Length") == "1234" and len(body) == (1234 if method == "GET" else 0)
        conn.close()
        assert statuses == [200, 500, 200]
        cfg = dataclasses.replace(s3, endpoint_url=proxy.endpoint)
        arrow_fs, path = storage.arrow_filesystem("s3://cytoray-test/proxy/a.bin", cfg)
        fs, _ = storage.filesystem("s3://cytoray-test/proxy/a.bin", cfg)
        for _ in range(3):
            assert arrow_fs.get_file_info(path).size == 1234
            assert fs.info(path, refresh=True)["size"] == 1234
        assert not storage.exists("s3://cytoray-test/proxy/missing.bin", cfg)
    assert proxy.injected["slowdown"] and proxy.injected["internal"], proxy.injected


def test_unreadable_parquet_stage_file_is_one_line_storage_error_naming_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cytoray import tables
    from cytoray.curation import shards
    from cytoray.errors import StorageError

    stage = tmp_path / "embeddings.parquet"  # a multi-file stage output with one empty part (what a 0-byte HEAD gave)
    stage.mkdir()
    pq.write_table(pa.table({"image_id": ["a", "b"]}), stage / "part-00000.parquet")
    (stage / "part-00001.parquet").write_bytes(b"")
    with pytest.raises(StorageError, match=r"cannot read Parquet file .*/part-00001.parquet \(ArrowInvalid: "
                                           r"Parquet file size is 0 bytes\).*rerun the stage") as err:
        shards.layout(str(stage))
    assert "\n" not in str(err.value)
    garbage = tmp_path / "duplicates.parquet"
    garbage.write_bytes(b"not parquet at all" * 10)
    for read in (tables.read_table, tables.read_schema):
        with pytest.raises(StorageError, match=r"cannot read Parquet file .*/duplicates.parquet \(ArrowInvalid"):
            read(str(garbage))
    with pytest.raises(FileNotFoundError):
        tables.read_table(str(tmp_path / "missing.parquet"))
    with pytest.raises(pa.ArrowInvalid, match="No match for FieldRef"):  # a missing column is the caller's
        tables.read_table(str(stage / "part-00000.parquet"), columns=["embedding"])
