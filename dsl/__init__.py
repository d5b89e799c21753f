"""Discrete Stochastic Localization: the science library (torch/numpy only)."""

__version__ = "0.1.0"
