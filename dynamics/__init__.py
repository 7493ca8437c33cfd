"""Measurement on a fixed-data training loss: Hessian-vector products, top eigenpairs, trace,
spectral density, third-order contractions and gradient-noise probes (DESIGN.md, "Public contracts")."""
from dynamics.density import SpectralDensity, spectral_density
from dynamics.lanczos import EigenResult, MatrixOperator, power_iteration, top_eigenpairs
from dynamics.noise import Alignment, NoiseProbe, noise_probe
from dynamics.objective import Objective
from dynamics.third_order import GradTraceEstimate, LowRank, grad_trace_hessian, third_order
from dynamics.trace import TraceEstimate, hessian_trace

__all__ = [
    "Objective",
    "top_eigenpairs", "power_iteration", "EigenResult", "MatrixOperator",
    "hessian_trace", "TraceEstimate",
    "spectral_density", "SpectralDensity",
    "third_order", "LowRank", "grad_trace_hessian", "GradTraceEstimate",
    "noise_probe", "NoiseProbe", "Alignment",
]
