"""tp-siglip: a tensor-parallel SigLIP vision encoder in pure PyTorch.

The public surface is small on purpose:

* :class:`SiglipVisionConfig` -- the vision tower's hyper-parameters (transformers' names and defaults).
* :class:`SiglipVisionTransformer` -- the encoder; ``from_pretrained`` loads a checkpoint with each rank
  reading only its slice of the weights.
* :class:`SiglipVisionOutput` -- what ``forward`` returns.
* :class:`DataParallelEncoder` -- the data-parallel mode (``from_pretrained(..., parallel="data")``).
* :class:`Siglip2VisionTransformer` -- SigLIP2 NaFlex towers (``from_pretrained`` returns one for them).
* :func:`preprocess`, :func:`load_image` -- images to ``pixel_values`` exactly as transformers'
  ``SiglipImageProcessor`` makes them; :func:`preprocess_naflex` as ``Siglip2ImageProcessor`` does.
"""

__version__ = "0.1.0"

from tp_siglip.config import SiglipVisionConfig
from tp_siglip.data_parallel import DataParallelEncoder
from tp_siglip.embeddings_reader import open_embeddings
from tp_siglip.model import Siglip2VisionTransformer, SiglipVisionOutput, SiglipVisionTransformer
from tp_siglip.processing import load_image, preprocess
from tp_siglip.processing_naflex import preprocess_naflex

__all__ = [
    "DataParallelEncoder",
    "Siglip2VisionTransformer",
    "SiglipVisionConfig",
    "SiglipVisionOutput",
    "SiglipVisionTransformer",
    "__version__",
    "load_image",
    "open_embeddings",
    "preprocess",
    "preprocess_naflex",
]
