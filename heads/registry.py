"""The head registry (kept apart from ``heads/__init__`` so head modules can import it without cycles)."""

from core.registry import Registry

HEADS = Registry("head")
