"""Unified cell-type vocabulary and the table that maps each dataset's own labels onto it.

Every source label is kept verbatim in ``source_label``; ``cell_type`` is its unified name or null when
the label is unknown (reported in ``summary.json``, never dropped). The table below is the documentation:
``docs/taxonomy.md`` is generated from it (:func:`markdown_doc`).

Unified vocabulary (peripheral blood and bone marrow, following the classes of Matek et al. 2019/2021 and
Acevedo et al. 2020):
"""

from __future__ import annotations

CELL_TYPES = (
    "neutrophil_segmented", "neutrophil_band", "lymphocyte", "lymphocyte_atypical", "monocyte",
    "eosinophil", "basophil", "blast", "promyelocyte", "promyelocyte_atypical", "myelocyte",
    "metamyelocyte", "immature_granulocyte", "erythroblast", "plasma_cell", "smudge_cell", "artefact",
    "platelet", "hairy_cell", "other",
)

# Labels shared by many sources; matched case-insensitively after the per-layout table.
COMMON = {
    "neutrophil": "neutrophil_segmented",  # sources without band/segmented split label mature neutrophils
    "segmented neutrophil": "neutrophil_segmented", "neutrophil_segmented": "neutrophil_segmented",
    "band neutrophil": "neutrophil_band", "neutrophil_band": "neutrophil_band",
    "lymphocyte": "lymphocyte", "lymphocytes": "lymphocyte", "lymph": "lymphocyte",
    "monocyte": "monocyte", "monocytes": "monocyte",
    "eosinophil": "eosinophil", "eosinophils": "eosinophil",
    "basophil": "basophil", "basophils": "basophil",
    "blast": "blast", "myeloblast": "blast", "lymphoblast": "blast", "monoblast": "blast",
    "promyelocyte": "promyelocyte", "myelocyte": "myelocyte", "metamyelocyte": "metamyelocyte",
    "erythroblast": "erythroblast", "normoblast": "erythroblast",
    "plasma cell": "plasma_cell", "plasma_cell": "plasma_cell",
    "smudge": "smudge_cell", "smudge cell": "smudge_cell", "smudge_cell": "smudge_cell",
    "artefact": "artefact", "artifact": "artefact", "platelet": "platelet", "platelets": "platelet",
}

# Per layout: the source's label -> unified cell type. Codes follow each dataset's own documentation.
LAYOUT_LABELS: dict[str, dict[str, str]] = {
    # Acevedo et al. 2020 (PBC): folder names, refined by file-name prefixes inside `ig` and `neutrophil`.
    "acevedo": {
        "basophil": "basophil", "eosinophil": "eosinophil", "erythroblast": "erythroblast",
        "ig": "immature_granulocyte", "lymphocyte": "lymphocyte", "monocyte": "monocyte",
        "neutrophil": "neutrophil_segmented", "platelet": "platelet",
        "SNE": "neutrophil_segmented", "BNE": "neutrophil_band", "NEUTROPHIL": "neutrophil_segmented",
        "MY": "myelocyte", "PMY": "promyelocyte", "MMY": "metamyelocyte", "IG": "immature_granulocyte",
        "BA": "basophil", "EO": "eosinophil", "ERB": "erythroblast", "LY": "lymphocyte", "MO": "monocyte",
        "PLATELET": "platelet",
    },
    # Matek et al. 2019, AML-Cytomorphology_LMU (TCIA): 15 class codes.
    "matek": {
        "BAS": "basophil", "EBO": "erythroblast", "EOS": "eosinophil", "KSC": "smudge_cell",
        "LYA": "lymphocyte_atypical", "LYT": "lymphocyte", "MMZ": "metamyelocyte", "MOB": "blast",
        "MON": "monocyte", "MYB": "myelocyte", "MYO": "blast", "NGB": "neutrophil_band",
        "NGS": "neutrophil_segmented", "PMB": "promyelocyte_atypical", "PMO": "promyelocyte",
    },
    # Matek et al. 2021, Bone-Marrow-Cytomorphology_MLL_Helmholtz_Fraunhofer (TCIA): 21 class codes.
    "bmc": {
        "ABE": "eosinophil", "ART": "artefact", "BAS": "basophil", "BLA": "blast", "EBO": "erythroblast",
        "EOS": "eosinophil", "FGC": "other", "HAC": "hairy_cell", "KSC": "smudge_cell",
        "LYI": "blast", "LYT": "lymphocyte", "MMZ": "metamyelocyte", "MON": "monocyte",
        "MYB": "myelocyte", "NGB": "neutrophil_band", "NGS": "neutrophil_segmented", "NIF": "other",
        "OTH": "other", "PEB": "erythroblast", "PLM": "plasma_cell", "PMO": "promyelocyte",
    },
    # Kouzehkanan et al. 2022, Raabin-WBC: five mature classes.
    "raabin": {"Basophil": "basophil", "Eosinophil": "eosinophil", "Lymphocyte": "lymphocyte",
               "Monocyte": "monocyte", "Neutrophil": "neutrophil_segmented"},
    # Rezatofighi & Soltanian-Zadeh 2011, LISC. `mixt` holds mixed fields: deliberately unmapped.
    "lisc": {"Baso": "basophil", "eosi": "eosinophil", "lymp": "lymphocyte", "mono": "monocyte",
             "neut": "neutrophil_segmented"},
    # Sidhom et al. 2021, APL_AML: CellaVision-style cell labels.
    "apl_aml": {
        "Neutrophil": "neutrophil_segmented", "Band": "neutrophil_band", "Lymphocyte": "lymphocyte",
        "Reactive lymphocyte": "lymphocyte_atypical", "Monocyte": "monocyte", "Eosinophil": "eosinophil",
        "Basophil": "basophil", "Blast": "blast", "Promyelocyte": "promyelocyte",
        "Myelocyte": "myelocyte", "Metamyelocyte": "metamyelocyte", "Plasma cell": "plasma_cell",
        "Smudge cell": "smudge_cell", "Giant platelet": "platelet", "Artifact": "artefact",
    },
    # BCCD (Kaggle `labels.csv` categories for the WBC in each field).
    "bccd": {"NEUTROPHIL": "neutrophil_segmented", "LYMPHOCYTE": "lymphocyte", "MONOCYTE": "monocyte",
             "EOSINOPHIL": "eosinophil", "BASOPHIL": "basophil"},
    # SegPC-2021: every annotated instance is a (myeloma) plasma cell.
    "segpc": {"plasma_cell": "plasma_cell"},
}


def unify(layout: str, source_label: str | None) -> str | None:
    """Unified cell type for a source label, or None when unknown (caller records it)."""
    if source_label is None or source_label == "":
        return None
    table = LAYOUT_LABELS.get(layout, {})
    if source_label in table:
        return table[source_label]
    key = source_label.strip().lower().replace("-", " ")
    if key in CELL_TYPES:
        return key
    return COMMON.get(key) or COMMON.get(key.replace("_", " "))


def markdown_table() -> str:
    """The mapping as a Markdown table (the body of ``docs/taxonomy.md``)."""
    rows = ["| layout | source label | cell_type |", "|---|---|---|"]
    for layout, table in LAYOUT_LABELS.items():
        rows += [f"| {layout} | `{src}` | {dst} |" for src, dst in table.items()]
    return "\n".join(rows)


def markdown_doc() -> str:
    """docs/taxonomy.md — regenerate with ``python -m cytoray.curation.taxonomy > docs/taxonomy.md``."""
    vocab = ", ".join(f"`{c}`" for c in CELL_TYPES)
    return (
        "# Cell-type taxonomy\n\n"
        "Every source label is kept verbatim in `source_label`; `cell_type` is its unified name, or null when the\n"
        "label is unknown (then it is counted under `unknown_labels` in `summary.json`, never dropped).\n"
        "Generated from `cytoray/curation/taxonomy.py` (a test checks this file matches the code).\n\n"
        f"Unified vocabulary: {vocab}.\n\n"
        "Labels not in the per-layout table are matched case-insensitively against common names\n"
        "(`neutrophil`, `plasma cell`, `myeloblast`, ...; see `COMMON` in the module).\n\n"
        f"{markdown_table()}\n"
    )


if __name__ == "__main__":
    print(markdown_doc(), end="")
