"""Exporting a trained backbone where users load models, each format with a model card.

exporter    export_model (any checkpoint load_model reads), export_run (a run's final checkpoint), the recipe
hf          transformers: Dinov2Model / Dinov2WithRegistersModel config, weights, image processor config
timm        timm: vit_*_patch14[_reg4]_dinov2 weights and hub config (model_args for other archs)
card        the model card (README.md with Hub front matter)
provenance  what a run directory says: training config, curated data summary, probe table
spec        what the exporters read off a built backbone

Export sits at the top: it imports models, features (preprocessing) and eval (the results table), never Ray,
and nothing in cytoray imports it.
"""

from cytoray.export.exporter import FORMATS, export_model, export_run

__all__ = ["FORMATS", "export_model", "export_run"]
