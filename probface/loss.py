"""ProbFace's training loss, registered as ``loss.name: probface``; it lives in ``losses/probface_loss.py``
with every other loss (this import path is kept)."""

from losses.probface_loss import ProbFaceLoss

__all__ = ["ProbFaceLoss"]
