"""Synthetic face masks drawn on aligned faces from the five landmarks (masked-face training data)."""

from data.masks.render import *  # noqa: F403
from data.masks.render import __doc__ as __doc__
