"""Stateful collectors bound to one live model/optimizer."""
