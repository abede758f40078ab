"""Dataset sources: the formats users really have, read into labelled splits of images.

One module per format, each registering itself with ``@register_source`` (:mod:`.base`):
``demo`` (the embedded CIFAR-10 subset), ``cifar10``, ``stl10`` and ``imagefolder``. The shipped
ones are declared in :mod:`ssltk.registry` and imported when first opened.
"""

from ssltk.data.sources.base import (
    ArraySplit,
    EncodedSplit,
    Source,
    SourceSplit,
    check_image,
    decode_image,
    decode_original,
    open_source,
    register_source,
    resize_and_center_crop,
    unregister_source,
)

__all__ = [
    "ArraySplit",
    "EncodedSplit",
    "Source",
    "SourceSplit",
    "check_image",
    "decode_image",
    "decode_original",
    "open_source",
    "register_source",
    "resize_and_center_crop",
    "unregister_source",
]
