"""Bundled models: NAME.pt (network-only checkpoints) and NAME.md (their model cards)."""
