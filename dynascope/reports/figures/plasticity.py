"""Figures: plasticity."""
