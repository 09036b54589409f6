"""cytoray: Ray-distributed curation and DINOv2 pretraining for hematology foundation models."""
