"""inference of DRT models."""
