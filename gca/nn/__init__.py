"""Layers of the DRT model."""
