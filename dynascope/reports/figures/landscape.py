"""Figures: landscape."""
