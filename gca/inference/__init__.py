"""inference of DRT models: the streaming cache, the CUDA-graph decoder and the inference benchmarks."""

from gca.inference.cache import DRTCache
from gca.inference.graph import GraphDecoder

__all__ = ["DRTCache", "GraphDecoder"]
