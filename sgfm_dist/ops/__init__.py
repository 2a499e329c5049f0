"""Single-device math on periodic fields ``[B, C, *S]``.

``domain``       the seam to parallelism (padding, FFT layout, reductions) — LocalDomain here
``wavelets``     periodized orthonormal separable DWT / inverse, coefficient layouts
``spectral``     FFT derivatives, Laplacian, Leray projection, vorticity, energy spectrum
``finite_diff``  periodic (and one-sided) central differences with exposed stencil halos
``dynamics``     Navier-Stokes drift, residual R(u), physics energy E(u), SPDE integrators

Nothing here imports torch.distributed, mpi4py or deepspeed.
"""
from .domain import LOCAL, LocalDomain  # noqa: F401
