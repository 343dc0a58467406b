"""Margin heads (CosFace, ArcFace variants, CurricularFace, MagFace, AdaFace, FRABSM, ...) and Partial FC."""
