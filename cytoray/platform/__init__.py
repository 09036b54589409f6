"""DINOv2 pretraining on Ray Train: models, the objective, the data stream, FSDP2, the loop, sweeps."""
