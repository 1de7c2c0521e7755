"""Scaling-law sweeps: definitions (`plan`), the resumable runner, fits and the report."""

from jaxarch.sweep.fit import (FitError, fit_scaling_law, isoflop_fits, isoflop_minimum,
                               predict_loss)
