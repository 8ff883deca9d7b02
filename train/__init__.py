"""Training: Optax state, the papers' recipes and `python -m train` (not built yet)."""
