"""Tiering: the hot store as a bounded cache over the archive (docs/architecture.md 11)."""
