"""Per-step training metrics to the run directory: ``metrics.csv`` and TensorBoard event files (rank 0).

After a restore, rows for steps at or after the restored step are dropped first, so the CSV is one
continuous curve however often the run was interrupted. With object-storage runs the files are written
to a local staging directory and copied to ``<run>/`` at every checkpoint and at the end.
"""

from __future__ import annotations

import csv
import os
import tempfile

from cytoray import storage

CSV_NAME = "metrics.csv"


class MetricsLog:
    def __init__(self, run_uri: str, start_step: int, storage_cfg: storage.StorageConfig | None = None):
        from tensorboardX import SummaryWriter

        protocol, path = storage.split_protocol(run_uri)
        self.remote = None if protocol == "file" else run_uri
        self.local_dir = path if self.remote is None else tempfile.mkdtemp(prefix="cytoray-metrics-")
        self.storage_cfg = storage_cfg
        os.makedirs(self.local_dir, exist_ok=True)
        self.csv_path = os.path.join(self.local_dir, CSV_NAME)
        self.rows = self._read_rows(start_step)
        self.fields = list(self.rows[0]) if self.rows else []
        self._rewrite()
        self.tb = SummaryWriter(os.path.join(self.local_dir, "tensorboard"), purge_step=start_step)

    def _read_rows(self, start_step: int) -> list[dict]:
        if self.remote and storage.exists(storage.join_uri(self.remote, CSV_NAME), self.storage_cfg):
            with open(self.csv_path, "wb") as f:
                f.write(storage.read_bytes(storage.join_uri(self.remote, CSV_NAME), self.storage_cfg))
        if not os.path.exists(self.csv_path):
            return []
        with open(self.csv_path, newline="") as f:
            return [r for r in csv.DictReader(f) if int(r["step"]) < start_step]

    def _rewrite(self) -> None:
        with open(self.csv_path, "w", newline="") as f:
            if self.fields:
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                w.writerows(self.rows)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        self.rows.append(row)
        new = [k for k in row if k not in self.fields]
        if new:  # first row, or a metric appears (e.g. after a skipped step): rewrite with the wider header
            self.fields += new
            self._rewrite()
        else:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        for k, v in metrics.items():
            self.tb.add_scalar(f"train/{k}", v, step)

    def sync(self) -> None:
        """Flush event files; copy both to object storage for remote runs."""
        self.tb.flush()
        if self.remote is None:
            return
        for root, _, files in os.walk(self.local_dir):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), self.local_dir)
                with open(os.path.join(root, name), "rb") as f:
                    storage.write_bytes(storage.join_uri(self.remote, rel), f.read(), self.storage_cfg)

    def close(self) -> None:
        self.sync()
        self.tb.close()
