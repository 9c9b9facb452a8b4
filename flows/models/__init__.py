"""Pretrained base models: where they come from (sources) and how they become bundles (importer)."""
