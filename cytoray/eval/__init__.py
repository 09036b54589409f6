"""Scoring backbones on labelled manifests, as DinoBloom reports them.

metrics     accuracy, balanced accuracy, weighted F1, per-class recall, confusion (+ PNG); ProbeError
methods     the cell-level methods (linear probe, kNN): one function + one registry entry each
mil         patient-level gated-attention ABMIL over bags of cell features (k-fold by patient, or across sites)
protocols   across sites: train on some datasets, score each held-out one; the Robustness Index of the features
probe       features of a checkpoint on manifests (cached) -> every method -> results.json; ``recipes/probe.py``
validation  per-checkpoint scoring while training runs (Ray Train validation task) and the run's results table

Evaluation sits below training (train calls the validator) and beside curation: it imports ``features`` for
images -> features and never imports curation or the training loop.
"""
