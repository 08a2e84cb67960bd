"""Figures: training."""
