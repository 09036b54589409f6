"""Test and benchmark infrastructure: a real local S3 endpoint, a proxy that injects S3 failures, small labelled
manifests, and a headless browser for the HTML reports.

``local_s3()`` starts moto's S3 server on 127.0.0.1 (a real HTTP endpoint; boto3, s3fs and pyarrow talk to
it exactly as to AWS). ``FlakyProxy`` sits in front of any endpoint and answers every ``fail_every``-th
request with an S3 ``503 SlowDown`` / ``500 InternalError`` or a dropped connection, so retry paths run
for real; otherwise it answers as the upstream does (``HEAD`` with the object's size and no body). Needs the ``dev`` extra (moto[server]).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cytoray.runtime import free_port
from cytoray.storage import StorageConfig, filesystem

TEST_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing-secret-not-real"}


@contextlib.contextmanager
def local_s3(bucket: str = "cytoray-test") -> Iterator[StorageConfig]:
    """A moto S3 server on 127.0.0.1 with ``bucket`` created; yields the StorageConfig to reach it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request (thousands in a benchmark)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1", max_attempts=8,
                        base_delay_s=0.01, max_delay_s=0.2, **TEST_CREDENTIALS)
    try:
        import boto3

        boto3.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region,
                     aws_access_key_id=cfg.access_key_id,
                     aws_secret_access_key=cfg.secret_access_key).create_bucket(Bucket=bucket)
        yield cfg
    finally:
        server.stop()


def upload_dir(local_dir: str, uri: str, cfg: StorageConfig) -> None:
    fs, path = filesystem(uri, cfg)
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as fh:
                fs.pipe_file(f"{path}/{rel}", fh.read())


class FlakyProxy:
    """HTTP proxy to ``upstream`` that fails every ``fail_every``-th request (cycling 503/500/drop)."""

    FAILURES = ("slowdown", "internal", "drop")

    def __init__(self, upstream: str, fail_every: int = 4):
        host, port = upstream.replace("http://", "").split(":")
        self.upstream = (host, int(port))
        self.fail_every = fail_every
        self.requests = 0
        self.injected = {k: 0 for k in self.FAILURES}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                failure = proxy._next_failure()
                if failure == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if failure:
                    status, code = (503, "SlowDown") if failure == "slowdown" else (500, "InternalError")
                    payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                               f"<Message>injected by FlakyProxy</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    if self.command == "HEAD":  # a HEAD response has no body (S3 sends the status alone)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                        self.send_header(k, v)
                if self.command == "HEAD":
                    # HEAD's Content-Length is the object's size (what a GET would send), not this empty body:
                    # pyarrow and s3fs size files by it
                    self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                    self.end_headers()
                else:
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _next_failure(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self.requests % self.fail_every:
                return None
            kind = self.FAILURES[(self.requests // self.fail_every) % len(self.FAILURES)]
            self.injected[kind] += 1
            return kind

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_cell_manifest(directory: str, num_images: int = 48, seed: int = 0, repeats: list[int] | None = None) -> str:
    """Synthetic cells as PNG files plus a minimal training manifest (image_id, uri, cell_type[, repeats]).

    For training tests that do not need a whole curated collection; returns the manifest's path.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cytoray.curation.synthetic.cells import CLASS_NAMES, Stain, render_cell
    from cytoray.images import encode_png

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = {"image_id": [], "uri": [], "cell_type": []}
    for i in range(num_images):
        cls = CLASS_NAMES[i % 10]
        path = os.path.join(directory, f"cell_{i:05d}.png")
        with open(path, "wb") as f:
            f.write(encode_png(render_cell(cls, 80, 0.3, Stain(), rng)))
        rows["image_id"].append(f"cell_{i:05d}")
        rows["uri"].append(path)
        rows["cell_type"].append(cls)
    if repeats is not None:
        rows["repeats"] = repeats
    out = os.path.join(directory, "manifest.parquet")
    pq.write_table(pa.table(rows), out)
    return out


def write_site_manifest(directory: str, num_images: int = 240, sites: list[str] | None = None, seed: int = 0,
                        size: int = 80) -> str:
    """Labelled synthetic cells from several acquisition sites (``synthetic.sites.SITES``; default: all), each
    with its own stain, illumination, blur and resolution; every site shows every class equally often. Manifest
    columns image_id, uri, cell_type, dataset (the site), for cross-site probing. Returns the manifest's path."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cytoray.curation.synthetic.cells import CLASS_NAMES
    from cytoray.curation.synthetic.sites import SITES, render_site_cell
    from cytoray.images import encode_png

    names = list(SITES) if sites is None else list(sites)
    unknown = [s for s in names if s not in SITES]
    if unknown:
        raise ValueError(f"unknown synthetic sites {unknown}; choose from {sorted(SITES)}")
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = {"image_id": [], "uri": [], "cell_type": [], "dataset": []}
    for i in range(num_images):
        site = names[i % len(names)]
        cls = CLASS_NAMES[(i // len(names)) % 10]
        image_id = f"{site}_{i:05d}"
        path = os.path.join(directory, f"{image_id}.png")
        with open(path, "wb") as f:
            f.write(encode_png(render_site_cell(cls, size, SITES[site], rng)))
        for k, v in zip(rows, (image_id, path, cls, site)):
            rows[k].append(v)
    out = os.path.join(directory, "manifest.parquet")
    pq.write_table(pa.table(rows), out)
    return out


def write_patient_manifest(directory: str, patients: int = 20, cells_per_patient: int = 16, seed: int = 0,
                           sites: list[str] | None = None) -> str:
    """Patient bags for MIL tests: each patient's cells drawn from its AML subtype's cell mix (the synthetic
    AML Hehr layout's ``HEHR_SUBTYPES``); manifest columns image_id, uri, patient_id, patient_label (no cell
    labels, as in AML Hehr). With ``sites`` (names of ``synthetic.sites.SITES``), patient p is seen at site
    p mod len(sites), imaged as that site does, and a ``dataset`` column names it; without, the images are those
    of the original helper. Returns the manifest's path."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cytoray.curation.synthetic.cells import Stain, render_cell
    from cytoray.curation.synthetic.layouts import HEHR_SUBTYPES
    from cytoray.curation.synthetic.sites import SITES, render_site_cell
    from cytoray.images import encode_png

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    subtypes = list(HEHR_SUBTYPES)
    rows = {"image_id": [], "uri": [], "patient_id": [], "patient_label": [], **({"dataset": []} if sites else {})}
    for p in range(patients):
        sub = subtypes[p % len(subtypes)]
        site = sites[p % len(sites)] if sites else None
        mix = HEHR_SUBTYPES[sub]
        names, weights = list(mix), np.array(list(mix.values()), np.float64)
        for j in range(cells_per_patient):
            cls = names[rng.choice(len(names), p=weights / weights.sum())]
            image_id = f"P{p:03d}_{j:03d}"
            path = os.path.join(directory, f"{image_id}.png")
            img = render_site_cell(cls, 80, SITES[site], rng) if site else render_cell(cls, 80, 0.3, Stain(), rng)
            with open(path, "wb") as f:
                f.write(encode_png(img))
            for k, v in zip(rows, (image_id, path, f"P{p:03d}", sub, site)):
                rows[k].append(v)
    out = os.path.join(directory, "manifest.parquet")
    pq.write_table(pa.table(rows), out)
    return out


def write_eval_manifest(directory: str, leaked_paths: list[str], fresh: int = 40, seed: int = 777) -> str:
    """An evaluation manifest for leakage tests: ``fresh`` unrelated synthetic cells plus a mirrored,
    re-encoded copy of every file in ``leaked_paths`` (the planted leaks). Returns the manifest's path."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cytoray.images import decode, encode_png

    base = pq.read_table(write_cell_manifest(directory, fresh, seed=seed))
    ids, uris = base.column("image_id").to_pylist(), base.column("uri").to_pylist()
    for i, src in enumerate(leaked_paths):
        with open(src, "rb") as fh:
            rgb = decode(fh.read(), min_side=1).rgb
        path = os.path.join(directory, f"leak_{i:03d}.png")
        with open(path, "wb") as fh:
            fh.write(encode_png(np.ascontiguousarray(rgb[:, ::-1])))
        ids.append(f"leak_{i:03d}")
        uris.append(path)
    out = os.path.join(directory, "eval_manifest.parquet")
    pq.write_table(pa.table({"image_id": ids, "uri": uris}), out)
    return out


def rendered_dom(path: str) -> str:
    """The DOM of a local HTML file after headless Chromium loaded it and ran its scripts."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise RuntimeError("Chromium is needed for the report tests: `make test` installs Debian's chromium "
                           "package (apt-get install chromium)")
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           "--dump-dom", "file://" + os.path.abspath(path)], capture_output=True, text=True,
                          timeout=120).stdout
