"""TinyFace rank-k identification."""
