"""Losses: cross-entropy variants, focal, FRABSM mining weight, triplet, closeness/diversity, ProbFace."""
