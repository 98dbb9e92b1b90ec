"""Graph passes: capture a model as an FX graph, find its weight matmuls, rewrite them."""
from jacquant.passes.capture import Capture, MatmulSite, capture
from jacquant.passes.rewrite import rewrite_owner

__all__ = ["Capture", "MatmulSite", "capture", "rewrite_owner"]
