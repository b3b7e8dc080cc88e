"""Activation statistics gathered during calibration (pure tensor math on activations)."""
