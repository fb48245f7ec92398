"""Names shared across layers: the offline `tiny` preset, and how a model reference reads as a path."""

from __future__ import annotations

# A seeded random-init miniature, built offline: `model.pretrained: tiny` (an SD-shaped pipeline) and a
# learned reward's `arch: tiny` (its network at toy width). Same code paths as the real models.
TINY = "tiny"


def looks_like_path(spec: str) -> bool:
    """A hub id is `org/name`; anything with more structure, or starting like a path, is a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
