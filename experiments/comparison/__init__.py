"""Predicted vs measured sharpness drift under label noise, for any network and noise: noise (the protocol),
projection (onto Gamma), phi (the reading at Phi), reading_mf (the same reading matrix-free), point, path
(predicted), continuation (measured), compare."""
from experiments.comparison.continuation import (ContinuationConfig, ContinuationResult, Measurement,
                                                 RegimeWarning, check_regime, extrapolate_to_zero_eta, measure,
                                                 progress_line, run_continuation, run_schedule)
from experiments.comparison.noise import (NOISE_MODELS, FlippedLabels, GaussianLabelNoise, LabelNoise, parse_noise,
                                         simplex_targets)
from experiments.comparison.path import (NodeRates, PredictedPath, SlopeFit, fit_slope, integrate_drift_path,
                                         predicted_path)
from experiments.comparison.phi import PhiCorrection, PhiReading, read_at_phi
from experiments.comparison.point import Point, build_point, check_model, check_on_gamma, fit, objective, point_at
from experiments.comparison.projection import (GramPreconditioner, GramPreconditionerMF, ProjectionReport,
                                               gram_solve, outputs_and_targets, project, reduced_jacobian,
                                               sharpness_at)
from experiments.comparison.reading_mf import (FlowCorrection, MatrixFreeReader, ProjectionNotConverged,
                                              lyapunov_factors, tangent_gradients, with_eigendecomposition)

__all__ = ["ContinuationConfig", "ContinuationResult", "Measurement", "RegimeWarning", "check_regime",
           "extrapolate_to_zero_eta", "measure", "progress_line", "run_continuation", "run_schedule",
           "NOISE_MODELS", "FlippedLabels", "GaussianLabelNoise", "LabelNoise", "parse_noise", "simplex_targets",
           "NodeRates", "PredictedPath", "SlopeFit", "fit_slope", "integrate_drift_path", "predicted_path",
           "PhiCorrection", "PhiReading", "read_at_phi",
           "Point", "build_point", "check_model", "check_on_gamma", "fit", "objective", "point_at",
           "GramPreconditioner", "GramPreconditionerMF", "ProjectionReport", "gram_solve", "outputs_and_targets",
           "project", "reduced_jacobian", "sharpness_at",
           "FlowCorrection", "MatrixFreeReader", "ProjectionNotConverged", "lyapunov_factors", "tangent_gradients",
           "with_eigendecomposition"]
