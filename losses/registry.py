"""The loss registry (apart from ``losses/__init__`` so loss modules can import it without cycles)."""

from core.registry import Registry

LOSSES = Registry("loss")
