"""Strata trainer: one trial becomes a trained network."""
