"""Graph passes: capture a model as an FX graph, find its weight matmuls, rewrite them."""
from .capture import Capture, MatmulSite, capture
from .rewrite import rewrite_owner

__all__ = ["Capture", "MatmulSite", "capture", "rewrite_owner"]
