"""Hot paths: Triton kernels on CUDA, their torch references everywhere else."""
from .fake_quant import fake_quant_backward, fake_quant_forward

__all__ = ["fake_quant_forward", "fake_quant_backward"]
