"""transformers' PIL image processor: the reference of tp-siglip's preprocessing, whatever else is installed.

With torchvision installed (the test oracles timm and open_clip need it) transformers 5 makes
``SiglipImageProcessor`` its torchvision backend, whose resize differs from Pillow's by a level here and
there. tp-siglip reproduces the PIL backend: ``SiglipImageProcessorPil`` (in transformers 4.x the plain
``SiglipImageProcessor`` is the PIL one).
"""

from __future__ import annotations

from typing import Any


def siglip_image_processor(**kwargs: Any) -> Any:
    """transformers' PIL ``SiglipImageProcessor`` built with ``kwargs`` (e.g. ``size={"height": 32, "width": 32}``)."""
    try:
        from transformers import SiglipImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: the slow processor is the PIL one
        from transformers import SiglipImageProcessor as Processor
    return Processor(**kwargs)
