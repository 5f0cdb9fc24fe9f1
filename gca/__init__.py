"""gca: Grouped Cross Attention and the DRT model.

    import gca
    model = gca.DRT(gca.DRTConfig.from_preset("tiny"))
"""

from gca.config import PRESETS, DRTConfig
from gca.model import DRT, DRTOutput
from gca.ops import grouped_cross_attention
from gca.retrieval import Retrieval

__version__ = "0.1.0"
__all__ = ["DRT", "DRTConfig", "DRTOutput", "PRESETS", "Retrieval", "grouped_cross_attention", "__version__"]
