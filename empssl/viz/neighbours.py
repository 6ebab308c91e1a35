"""``empssl neighbours``: query images and their top-k neighbours by embedding, as a grid (docs/training.md section
11). Neighbours are found by cosine similarity of the bag-of-features embeddings; a query never finds itself."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .common import ImageSet
from .grids import NEUTRAL, OTHER, SAME, GridLayout, draw_grid, scale_for


@torch.no_grad()
def nearest_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None, chunk: int = 1024
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices (Q, k) into ``bank``, cosine similarities (Q, k)), most similar first. ``exclude`` (Q,): the bank
    index of each query itself (or -1), never returned (queries drawn from the bank)."""
    k = min(k, bank.shape[0] - (0 if exclude is None else 1))
    if k < 1:
        raise ValueError("the bank holds no image besides the queries: nothing to show as neighbours")
    bank = F.normalize(bank.float(), dim=1)
    indices, similarities = [], []
    for start in range(0, queries.shape[0], chunk):
        similarity = F.normalize(queries[start : start + chunk].float(), dim=1) @ bank.T
        if exclude is not None:
            own = exclude[start : start + chunk]
            rows = torch.arange(own.shape[0], device=own.device)[own >= 0]
            similarity[rows, own[own >= 0]] = -float("inf")
        top = similarity.topk(k, dim=1)
        indices.append(top.indices)
        similarities.append(top.values)
    return torch.cat(indices), torch.cat(similarities)


def neighbour_grid(
    queries: ImageSet, bank: ImageSet, indices: torch.Tensor, similarities: torch.Tensor
) -> Tuple[object, GridLayout, List[list]]:
    """(PIL picture, its layout, CSV rows): one row per query, the query in column 0 and its neighbours after it,
    framed green where a neighbour has the query's label and red where not (grey without labels), captioned with
    their class and similarity. CSV rows: query, query name, query label, rank, neighbour index, neighbour name,
    neighbour label, similarity."""
    layout = GridLayout(
        rows=len(queries),
        columns=indices.shape[1] + 1,
        cell=int(queries.images.shape[1]) * scale_for(int(queries.images.shape[1])),
        separated=(0,),
    )
    query_pixels, bank_pixels = queries.images.cpu().numpy(), bank.images.cpu().numpy()
    query_labels, bank_labels = queries.label_names(), bank.label_names()
    labelled = queries.labels is not None and bank.labels is not None
    images, frames, captions, rows = [], [], [], []
    for q, (row_indices, row_similarities) in enumerate(zip(indices.tolist(), similarities.tolist())):
        images.append([query_pixels[q]] + [bank_pixels[i] for i in row_indices])
        frames.append(
            [NEUTRAL]
            + [(SAME if bank_labels[i] == query_labels[q] else OTHER) if labelled else NEUTRAL for i in row_indices]
        )
        captions.append(
            [f"query {query_labels[q] or ''}".strip()]
            + [f"{s:.2f} {bank_labels[i] or ''}".strip() for i, s in zip(row_indices, row_similarities)]
        )
        for rank, (i, s) in enumerate(zip(row_indices, row_similarities), 1):
            rows.append([q, queries.names[q], query_labels[q] or "", rank, i, bank.names[i], bank_labels[i] or "", s])
    return draw_grid(layout, images, frames, captions), layout, rows


NEIGHBOUR_COLUMNS = (
    "query",
    "query_name",
    "query_label",
    "rank",
    "neighbour",
    "neighbour_name",
    "neighbour_label",
    "similarity",
)
