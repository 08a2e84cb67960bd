"""Figures: curvature."""
