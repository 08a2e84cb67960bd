"""Figures: signal."""
