"""Image features shared by curation (embed, dedup) and evaluation (probe, kNN, ABMIL).

preprocess   image -> normalised tensor, with the settings the backbone was trained with
backbone     build a backbone from a spec (checkpoint URI, ``random:<arch>``) and run it on images
handcrafted  the weights-free RudolfV-style colour / texture / morphology features
fingerprint  copy-detection fingerprints (content-anchored candidate views, verification thumbnail)
extract      one Ray Data actor that decodes each image once and emits features (+ fingerprints)

Neither curation nor evaluation imports the other: both import this package.
"""
