"""Input pipeline: tensorflow-datasets sources and the papers' augmentations (not built yet)."""
