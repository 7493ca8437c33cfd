"""sde.terms: the one `SlowSDETerms` class, shared by the dense and matrix-free paths."""
import dataclasses
import importlib

import pytest
import torch

import sde
from sde.terms import SlowSDETerms


@pytest.mark.parametrize("module", ["sde.slow_sde", "sde.matrix_free"])
def test_one_class_seen_from_every_module(module):
    # `sde.slow_sde` is also the function's name on the package, hence import_module
    assert sde.SlowSDETerms is SlowSDETerms
    assert importlib.import_module(module).SlowSDETerms is SlowSDETerms


def test_terms_are_frozen():
    z = torch.zeros(2, dtype=torch.float64)
    terms = SlowSDETerms(drift=z, diffusion=torch.zeros(2, 2, dtype=torch.float64), drift_I=z,
                         drift_II=z, ito_correction=z, raw_drift=z, rank=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        terms.rank = 2
