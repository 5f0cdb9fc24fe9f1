"""eval of DRT models."""
