"""Hot paths: Triton kernels on CUDA, their torch references everywhere else."""
from jacquant.kernels.fake_quant import (
    affine_backward,
    affine_forward,
    fake_quant_backward,
    fake_quant_forward,
)

__all__ = ["affine_backward", "affine_forward", "fake_quant_forward", "fake_quant_backward"]
