"""One adapter per published dataset layout, plus two generic ones for private data.

An adapter lists a dataset root (local or object storage) and returns one :class:`Record` per image file,
the metadata files it consumed, and the files that fall outside its layout (reported, never silently
dropped). Reading pixels happens later, in parallel, in ``ingest.py``.

Layouts (cited from each dataset's publication / data descriptor):

- ``acevedo`` — Acevedo et al. 2020, "A dataset of microscopic peripheral blood cell images for
  development of automatic recognition systems", Data in Brief 30:105474 (Mendeley Data "PBC dataset
  normal DIB"): ``PBC_dataset_normal_DIB/<basophil|eosinophil|erythroblast|ig|lymphocyte|monocyte|
  neutrophil|platelet>/<PREFIX>_<n>.jpg``, 360×363 JPEG; the prefix refines ``ig`` (MY/PMY/MMY) and
  ``neutrophil`` (SNE/BNE).
- ``matek`` — Matek et al. 2019, Nat Mach Intell 1:538, TCIA collection AML-Cytomorphology_LMU:
  ``AML-Cytomorphology_LMU/<CODE>/<CODE>_<nnnn>.tiff``, 400×400 TIFF, 15 class codes (NGS, LYT, MYO...).
- ``bmc`` — Matek et al. 2021, Blood 138:1917, TCIA Bone-Marrow-Cytomorphology_MLL_Helmholtz_Fraunhofer:
  ``BM_cytomorphology_data/<CODE>/<0001-1000>/<CODE>_<nnnnn>.jpg``, 250×250 JPEG, 21 class codes.
- ``raabin`` — Kouzehkanan et al. 2022, Sci Rep 12:1123, Raabin-WBC cropped double-labelled cells:
  ``<Train|TestA|TestB>/<Basophil|Eosinophil|Lymphocyte|Monocyte|Neutrophil>/<id>.jpg``, 575×575.
- ``lisc`` — Rezatofighi & Soltanian-Zadeh 2011, Comput Med Imaging Graph 35:333, LISC:
  ``LISC Database/Main Dataset/<Baso|eosi|lymp|mono|neut|mixt>/<n>.bmp``, 720×576 BMP.
- ``aml_hehr`` — Hehr et al. 2023, PLOS Digit Health 2:e0000187, TCIA AML-Cytomorphology_MLL_Helmholtz:
  ``data/<subtype>/<patient>/image_<k>.tif`` (144×144) and a patient table ``metadata.csv``
  (``patient_id, diagnose, ...``); subtypes CBFB_MYH11, NPM1, PML_RARA, RUNX1_RUNX1T1 and SCD controls.
- ``apl_aml`` — Sidhom et al. 2021, Nat Commun 12:1605 (APL vs AML, Johns Hopkins): patient table
  ``master.csv`` (``Patient_ID, Diagnosis``) and cells ``Data/<Patient_ID>/Signed slides/<cell label>/*.jpg``.
- ``bccd`` — BCCD (Shenggan, MIT licence; Pascal VOC): ``BCCD/JPEGImages/BloodImage_nnnnn.jpg`` with
  ``BCCD/Annotations/BloodImage_nnnnn.xml`` boxes (WBC / RBC / Platelets) and Kaggle's ``labels.csv``
  (Image, Category) giving the WBC type. One crop per WBC box.
- ``segpc`` — SegPC-2021 (Gupta et al., multiple-myeloma plasma-cell segmentation): ``train/x/<id>.bmp``
  fields and ``train/y/<id>_<k>.bmp`` one instance mask per cell (20 = cytoplasm, 40 = nucleus). One crop
  per mask.
- ``class_folders`` — generic: ``<root>/<label>/**/<image>``; files directly under root have no label.
- ``table`` — generic: a CSV or Parquet table with a ``uri`` column (absolute, or relative to the table)
  and optional ``label``, ``patient_id``, ``patient_label``, ``split`` columns. ``options.table`` names the
  file (default ``labels.csv``, or the URI itself when it ends in .csv/.parquet).
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from cytoray import storage
from cytoray.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
# Files that are no image whatever their content: a root holding only these (and hidden files, label tables) fails
# pre-flight. Any other name may be an image (ingest decodes by content: .ppm, no extension, ...).
DOCUMENT_EXTENSIONS = {".txt", ".md", ".rst", ".csv", ".tsv", ".json", ".yaml", ".yml", ".xml", ".html", ".pdf",
                       ".doc", ".docx", ".xls", ".xlsx", ".parquet", ".zip", ".tar", ".gz", ".tgz", ".7z", ".sha256",
                       ".md5"}
# Pre-flight looks at no more than this many entries of a dataset root for an image file (a few listing requests
# on object storage); a root it cannot decide on within them is left to the listing at ingest.
PREFLIGHT_ENTRIES = 10_000


@dataclass
class Record:
    """One input image file, with what the layout says about it."""

    uri: str
    relpath: str
    source_label: str | None = None
    patient_id: str | None = None
    patient_label: str | None = None
    split: str | None = None
    boxes: list[list[int]] | None = None  # detection sets: x0, y0, x1, y1 per white cell
    box_labels: list[str | None] | None = None
    mask_uris: list[str] | None = None  # segmentation sets: one instance mask per cell


@dataclass
class Listing:
    records: list[Record] = field(default_factory=list)
    metadata_files: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (relpath, why)


class AdapterError(UserError):
    """The dataset does not look like the layout it was declared as; the message says what is missing."""


def _list_files(fs, root: str) -> list[str]:
    if not storage.with_retries(lambda: fs.exists(root), what=f"stat {root}"):
        raise AdapterError(f"dataset root does not exist: {root}")
    paths = storage.with_retries(lambda: fs.find(root, withdirs=False), what=f"list {root}")
    base = root.rstrip("/") + "/"
    return sorted(p[len(base):] for p in paths if p.startswith(base))


def _is_hidden(relpath: str) -> bool:
    return any(part.startswith(".") or part in ("Thumbs.db", "__MACOSX") for part in relpath.split("/"))


def _first_image(fs, root: str, may_be_image, limit: int = PREFLIGHT_ENTRIES) -> tuple[bool, int]:
    """Walk ``root`` top-down until a file ``may_be_image(relpath)`` turns up. (True, files seen) when one does or
    when ``limit`` entries were seen first (undecided: no verdict); (False, files in the tree) otherwise."""
    base = root.rstrip("/") + "/"
    seen = files_seen = 0
    for folder, dirs, files in fs.walk(root, on_error="raise"):  # an error must not read as an empty folder
        rel = folder.rstrip("/")[len(base):]  # the root itself: ""
        prefix = f"{rel}/" if rel else ""
        if any(may_be_image(prefix + f) for f in files):
            return True, files_seen + len(files)
        dirs[:] = [d for d in dirs if not _is_hidden(d)]
        files_seen += len(files)
        seen += len(files) + len(dirs)
        if seen >= limit:
            return True, files_seen
    return False, files_seen


def _read_bytes(fs, path: str) -> bytes:
    return storage.with_retries(lambda: fs.cat_file(path), what=f"read {path}")


def _read_text(fs, path: str) -> str:
    return _read_bytes(fs, path).decode("utf-8-sig")


def _csv_rows(fs, path: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(_read_text(fs, path))))


class Adapter:
    """Base: walk the root; subclasses turn a relative path into a Record (or None: outside the layout)."""

    layout = ""
    metadata_names: tuple[str, ...] = ()
    required_files: tuple[str, ...] = ()  # label tables the layout cannot do without, relative to the root

    def __init__(self, options: dict | None = None):
        self.options = dict(options or {})

    def check(self, fs, root: str, root_uri: str) -> None:
        """Cheap checks before any work (one stat per file, a listing with a limit): the root and the required
        label files exist, and the root holds an image file."""
        if not storage.with_retries(lambda: fs.exists(root), what=f"stat {root_uri}"):
            raise AdapterError(f"dataset root does not exist: {root_uri}; check the dataset's uri")
        for name in self.required_files:
            path = f"{root.rstrip('/')}/{name}"
            if not storage.with_retries(lambda path=path: fs.exists(path), what=f"stat {path}"):
                raise AdapterError(f"{self.layout} layout needs {name} under {root_uri}")
        found, files = storage.with_retries(lambda: _first_image(fs, root, self.may_be_image), what=f"list {root_uri}")
        if not found:
            raise AdapterError(f"no image files under {root_uri} ({files} file{'' if files == 1 else 's'}: hidden, "
                               "label tables or documents only); check the dataset's uri")

    def may_be_image(self, relpath: str) -> bool:
        """Could the listing take this file as an image? Not hidden, not the layout's metadata, not a document."""
        ext = posixpath.splitext(relpath)[1].lower()
        return not (_is_hidden(relpath) or relpath in self.metadata_names or self.is_metadata(relpath)
                    or ext in DOCUMENT_EXTENSIONS)

    def prepare(self, fs, root: str, files: list[str]) -> None:
        """Read label tables etc. before records are made."""

    def record(self, relpath: str) -> Record | None:
        raise NotImplementedError

    def list(self, fs, root: str, root_uri: str) -> Listing:
        files = _list_files(fs, root)
        out = Listing()
        self.fs, self.root, self.root_uri = fs, root.rstrip("/"), root_uri.rstrip("/")
        self.prepare(fs, root, files)
        for rel in files:
            if _is_hidden(rel):
                out.ignored.append((rel, "hidden_file"))
            elif rel in self.metadata_names or self.is_metadata(rel):
                out.metadata_files.append(rel)
            else:
                rec = self.record(rel)
                if rec is None:
                    out.ignored.append((rel, "outside_layout"))
                else:
                    out.records.append(rec)
        if not out.records:
            raise AdapterError(f"no image files found for layout '{self.layout}' under {root_uri} "
                               f"({len(files)} files listed); check the URI and the layout name")
        return out

    def is_metadata(self, relpath: str) -> bool:
        return False

    def uri(self, relpath: str) -> str:
        return f"{self.root_uri}/{relpath}"

    def make(self, relpath: str, **kw) -> Record:
        return Record(self.uri(relpath), relpath, **kw)


def _parts(relpath: str) -> list[str]:
    return relpath.split("/")


class AcevedoAdapter(Adapter):
    layout = "acevedo"

    def record(self, rel):
        parts = _parts(rel)
        if len(parts) < 2:
            return None
        prefix = parts[-1].split("_", 1)[0]
        label = prefix if prefix in ("SNE", "BNE", "MY", "PMY", "MMY") else parts[-2]
        return self.make(rel, source_label=label)


class FolderCodeAdapter(Adapter):
    """Class code = the folder holding the file (Matek, LISC), skipping BMC's 0001-1000 range folders."""

    def record(self, rel):
        parts = _parts(rel)
        folders = [p for p in parts[:-1] if not re.fullmatch(r"\d+-\d+", p)]
        return self.make(rel, source_label=folders[-1]) if folders else None


class MatekAdapter(FolderCodeAdapter):
    layout = "matek"


class BMCAdapter(FolderCodeAdapter):
    layout = "bmc"


class LISCAdapter(FolderCodeAdapter):
    layout = "lisc"


class RaabinAdapter(Adapter):
    layout = "raabin"

    def record(self, rel):
        parts = _parts(rel)
        if len(parts) < 3:
            return None
        return self.make(rel, source_label=parts[-2], split=parts[-3])


class AMLHehrAdapter(Adapter):
    layout = "aml_hehr"
    metadata_names = ("metadata.csv",)

    def prepare(self, fs, root, files):
        self.diagnosis = {}
        if "metadata.csv" in files:
            for row in _csv_rows(fs, f"{root.rstrip('/')}/metadata.csv"):
                self.diagnosis[row["patient_id"]] = row.get("diagnose") or row.get("diagnosis")

    def record(self, rel):
        parts = _parts(rel)
        if len(parts) < 3:
            return None
        subtype, patient = parts[-3], parts[-2]
        return self.make(rel, patient_id=patient, patient_label=self.diagnosis.get(patient, subtype))


class APLAMLAdapter(Adapter):
    layout = "apl_aml"
    metadata_names = ("master.csv",)
    required_files = ("master.csv",)

    def prepare(self, fs, root, files):
        if "master.csv" not in files:
            raise AdapterError(f"apl_aml layout needs master.csv (Patient_ID, Diagnosis) under {self.root_uri}")
        self.diagnosis = {r["Patient_ID"]: r["Diagnosis"] for r in _csv_rows(fs, f"{root.rstrip('/')}/master.csv")}

    def record(self, rel):
        parts = _parts(rel)
        if len(parts) < 3 or parts[0] != "Data":
            return None
        patient = parts[1]
        label = parts[-2] if len(parts) >= 5 else None  # Data/<pid>/Signed slides/<label>/<file>
        return self.make(rel, source_label=label, patient_id=patient, patient_label=self.diagnosis.get(patient))


class BCCDAdapter(Adapter):
    layout = "bccd"

    def is_metadata(self, rel):
        return rel.endswith((".xml", ".csv", ".txt"))

    def prepare(self, fs, root, files):
        self.boxes: dict[str, list[list[int]]] = {}
        self.category: dict[str, str] = {}
        base = root.rstrip("/")
        for rel in files:
            if rel.endswith(".xml"):
                try:
                    tree = ET.fromstring(_read_text(fs, f"{base}/{rel}"))
                except ET.ParseError as exc:
                    raise AdapterError(f"BCCD annotation {rel} is not valid XML: {exc}") from exc
                stem = posixpath.splitext(posixpath.basename(rel))[0]
                self.boxes[stem] = [
                    [int(float(obj.findtext(f"bndbox/{k}"))) for k in ("xmin", "ymin", "xmax", "ymax")]
                    for obj in tree.iter("object") if (obj.findtext("name") or "").strip().upper() == "WBC"
                ]
        if "labels.csv" in files:
            for row in _csv_rows(fs, f"{base}/labels.csv"):
                if row.get("Image") and row.get("Category"):
                    self.category[f"BloodImage_{int(row['Image']):05d}"] = row["Category"].strip()

    def record(self, rel):
        stem = posixpath.splitext(posixpath.basename(rel))[0]
        boxes = self.boxes.get(stem, [])
        cat = self.category.get(stem)
        label = cat if cat and "," not in cat else None  # several WBC types listed: no per-box label
        return self.make(rel, boxes=boxes, box_labels=[label] * len(boxes))


class SegPCAdapter(Adapter):
    layout = "segpc"

    def is_metadata(self, rel):
        return "/y/" in f"/{rel}"

    def prepare(self, fs, root, files):
        self.masks: dict[str, list[str]] = {}
        for rel in files:
            if "/y/" in f"/{rel}":
                stem = posixpath.splitext(posixpath.basename(rel))[0]
                image_stem = stem.rsplit("_", 1)[0]
                folder = posixpath.dirname(posixpath.dirname(rel))
                self.masks.setdefault(posixpath.join(folder, image_stem), []).append(self.uri(rel))

    def record(self, rel):
        if "/x/" not in f"/{rel}":
            return None
        stem = posixpath.splitext(posixpath.basename(rel))[0]
        folder = posixpath.dirname(posixpath.dirname(rel))
        masks = sorted(self.masks.get(posixpath.join(folder, stem), []))
        return self.make(rel, mask_uris=masks, source_label="plasma_cell")


class ClassFoldersAdapter(Adapter):
    layout = "class_folders"

    def record(self, rel):
        parts = _parts(rel)
        return self.make(rel, source_label=parts[0] if len(parts) > 1 else None)


class TableAdapter(Adapter):
    """CSV/Parquet of uri + labels. Files under the root that the table does not name are reported."""

    layout = "table"

    def _paths(self, root, root_uri):
        name = self.options.get("table", "labels.csv")
        if root.endswith((".csv", ".parquet")):
            return root, posixpath.dirname(root), root_uri.rsplit("/", 1)[0]
        return f"{root.rstrip('/')}/{name}", root.rstrip("/"), root_uri.rstrip("/")

    def check(self, fs, root, root_uri):
        """The table exists and has a row (Parquet: its footer; CSV: its first 64 KiB)."""
        table_path = self._paths(root, root_uri)[0]
        if not storage.with_retries(lambda: fs.exists(table_path), what=f"stat {table_path}"):
            raise AdapterError(f"table layout: {table_path} not found; set options.table or point uri at the file")

        def has_rows() -> bool:
            with fs.open(table_path, "rb") as fh:
                if table_path.endswith(".parquet"):
                    return pq.ParquetFile(fh).metadata.num_rows > 0
                head = fh.read(1 << 16)
            lines = [line for line in head.splitlines() if line.strip()]
            return len(lines) > 1 or len(head) == 1 << 16  # a header and a row, or more than was read

        if not storage.with_retries(has_rows, what=f"read {table_path}"):
            raise AdapterError(f"table {table_path} lists no images; add rows (uri, label, ...) or fix the uri")

    def list(self, fs, root, root_uri):
        table_path, base, base_uri = self._paths(root, root_uri)
        self.check(fs, root, root_uri)
        if table_path.endswith(".parquet"):
            rows = pq.read_table(io.BytesIO(_read_bytes(fs, table_path))).to_pylist()
        else:
            rows = _csv_rows(fs, table_path)
        col = {k: self.options.get(f"{k}_column", k) for k in ("uri", "label", "patient_id", "patient_label", "split")}
        if rows and col["uri"] not in rows[0]:
            raise AdapterError(f"table {table_path} has no '{col['uri']}' column (columns: {sorted(rows[0])}); "
                               f"set options.uri_column")
        out = Listing(metadata_files=[posixpath.relpath(table_path, base)])
        for row in rows:
            u = str(row[col["uri"]])
            full = u if "://" in u or u.startswith("/") else f"{base_uri}/{u}"
            rel = u if "://" not in u and not u.startswith("/") else u.rsplit("/", 1)[-1]
            out.records.append(Record(full, rel, *(row.get(col[k]) or None for k in
                                                   ("label", "patient_id", "patient_label", "split"))))
        named = {r.relpath for r in out.records} | set(out.metadata_files)
        if not root.endswith((".csv", ".parquet")):
            for rel in _list_files(fs, base):
                if rel not in named:
                    out.ignored.append((rel, "hidden_file" if _is_hidden(rel) else "not_in_table"))
        if not out.records:
            raise AdapterError(f"table {table_path} lists no images")
        return out


ADAPTERS: dict[str, type[Adapter]] = {
    a.layout: a for a in (AcevedoAdapter, MatekAdapter, BMCAdapter, RaabinAdapter, LISCAdapter, AMLHehrAdapter,
                          APLAMLAdapter, BCCDAdapter, SegPCAdapter, ClassFoldersAdapter, TableAdapter)
}


def get_adapter(layout: str, options: dict | None = None) -> Adapter:
    if layout not in ADAPTERS:
        raise AdapterError(f"unknown layout '{layout}'; choose one of {sorted(ADAPTERS)} "
                           f"(class_folders or table for private data)")
    return ADAPTERS[layout](options)
