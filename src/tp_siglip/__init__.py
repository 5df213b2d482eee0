"""tp-siglip: a tensor-parallel SigLIP vision encoder in pure PyTorch.

The public surface is small on purpose:

* :class:`SiglipVisionConfig` -- the vision tower's hyper-parameters (transformers' names and defaults).
* :class:`SiglipVisionTransformer` -- the encoder; ``from_pretrained`` loads a checkpoint with each rank
  reading only its slice of the weights.
* :class:`SiglipVisionOutput` -- what ``forward`` returns.
"""

__version__ = "0.1.0"

from tp_siglip.config import SiglipVisionConfig
from tp_siglip.model import SiglipVisionOutput, SiglipVisionTransformer

__all__ = ["SiglipVisionConfig", "SiglipVisionOutput", "SiglipVisionTransformer", "__version__"]
