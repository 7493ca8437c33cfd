"""Measurement on a fixed-data training loss: Hessian-vector products, top eigenpairs, trace,
spectral density, matrix functions f(A) v and traces tr(f(A) B) by Lanczos, third-order
contractions, gradient-noise probes and output-Jacobian primitives (`dynamics.jacobian`) (DESIGN.md, "Public contracts")."""
from dynamics import jacobian
from dynamics.density import SpectralDensity, spectral_density
from dynamics.lanczos import EigenResult, MatrixOperator, power_iteration, top_eigenpairs
from dynamics.matrix_function import (FunctionApplication, FunctionTraceEstimate, SpectralOperator, apply_function,
                                      trace_function_product)
from dynamics.noise import Alignment, NoiseProbe, noise_probe
from dynamics.objective import Objective
from dynamics.third_order import GradTraceEstimate, LowRank, grad_trace_hessian, third_order
from dynamics.trace import TraceEstimate, hessian_trace

__all__ = [
    "Objective",
    "top_eigenpairs", "power_iteration", "EigenResult", "MatrixOperator",
    "hessian_trace", "TraceEstimate",
    "apply_function", "FunctionApplication", "SpectralOperator", "trace_function_product", "FunctionTraceEstimate",
    "spectral_density", "SpectralDensity",
    "third_order", "LowRank", "grad_trace_hessian", "GradTraceEstimate",
    "noise_probe", "NoiseProbe", "Alignment",
    "jacobian",
]
