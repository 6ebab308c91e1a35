"""One interface module per op: its torch.library schemas (the extension's are defined in csrc/ops.cpp),
fake implementations, autograd formula, the table of backends (what each supports and why it refuses)
and the dispatch, first fit wins (empssl.backends holds the machinery they share).

- ``augment``: the multi-patch augmentation, patches from (images, source_index, params);
- ``tcr``: the Total Coding Rate R of every group of z (n, b, d), forward and gradient in one call.

Importing this package registers both ops; ``empssl.augment`` and ``empssl.loss`` call them.
"""

from . import augment, tcr

__all__ = ["augment", "tcr"]
