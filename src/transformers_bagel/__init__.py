"""BAGEL for transformers."""
