"""``empssl embed``: the bag-of-features embeddings of images, to a file (docs/training.md section 11).

``.npy``: the embeddings (N, D) float32, with a ``.json`` beside it holding each row's image (a file path, or
``DATASET:SPLIT/INDEX``), its label (null without labels), the class names and how the embeddings were made.
``.safetensors`` (needs the safetensors package): the tensor ``embeddings`` (and ``labels`` where there are labels)
with the same description as the file's metadata (its ``empssl`` key, JSON).
"""

from __future__ import annotations

import io
import json
from typing import Any, Dict

import numpy as np
import torch

from ..files import write_atomically
from .common import ImageSet, beside

EMBEDDING_SUFFIXES = (".npy", ".safetensors")


def embedding_description(images: ImageSet, about: Dict[str, Any]) -> Dict[str, Any]:
    """What the rows of an embedding file are: ``about`` (checkpoint, data, patches, ...) and each row's image and
    label."""
    labels = None if images.labels is None else images.labels.cpu().tolist()
    return {**about, "images": list(images.names), "labels": labels, "classes": list(images.classes)}


def write_embeddings(out: str, embeddings: torch.Tensor, description: Dict[str, Any]) -> str:
    """Write ``embeddings`` (N, D) to ``out`` (.npy with a .json beside it, or .safetensors), atomically; returns
    the path of the description (the .json, or ``out`` itself)."""
    array = embeddings.detach().float().cpu().contiguous()
    if out.lower().endswith(".safetensors"):
        try:
            from safetensors.torch import save
        except ImportError:
            raise ValueError(
                "an --out ending in .safetensors needs the safetensors package: pip install safetensors"
            ) from None
        tensors = {"embeddings": array}
        if description.get("labels") is not None:
            tensors["labels"] = torch.tensor(description["labels"], dtype=torch.int64)
        data = save(tensors, metadata={"empssl": json.dumps(description)})
        write_atomically(out, lambda f: f.write(data))
        return out

    def save_npy(f):
        buffer = io.BytesIO()
        np.save(buffer, array.numpy(), allow_pickle=False)
        f.write(buffer.getvalue())

    write_atomically(out, save_npy)
    sidecar = beside(out, ".json")
    write_atomically(sidecar, lambda f: f.write(json.dumps(description, indent=1).encode()))
    return sidecar
