"""MegaFace challenge 1: FaceScrub probes against up to a million distractors (rank-1, TAR@FAR)."""
