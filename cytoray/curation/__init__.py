"""Curation: heterogeneous smear datasets -> one deduplicated, clustered, balanced manifest + report."""
