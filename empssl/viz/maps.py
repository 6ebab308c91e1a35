"""``empssl map``: a 2-D map of the embeddings, coloured by label (docs/training.md section 11): t-SNE from
scikit-learn, or UMAP where umap-learn is installed; both optional packages, each missing one a one-line error."""

from __future__ import annotations

from typing import List, Optional

import numpy as np

MAP_METHODS = ("auto", "tsne", "umap")
FIGURE_INCHES, FIGURE_DPI = 8.0, 100  # the PNG is 800 x 800 pixels
MAX_LEGEND_CLASSES = 20  # more classes: colours only (a legend of hundreds of names helps no one)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def resolve_method(method: str) -> str:
    """ "tsne" or "umap" for ``method`` ("auto": UMAP where umap-learn is installed, else t-SNE); ValueError naming
    the package to install when the one needed is missing."""
    if method not in MAP_METHODS:
        raise ValueError(f"--method must be one of {', '.join(MAP_METHODS)}, got {method!r}")
    if method == "auto":
        method = "umap" if _installed("umap") else "tsne"
    module, package = ("umap", "umap-learn") if method == "umap" else ("sklearn", "scikit-learn")
    if not _installed(module):
        raise ValueError(f"empssl map --method {method} needs {package}, which is not installed: pip install {package}")
    return method


def two_d_map(embeddings: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(N, 2) float64 coordinates of the rows of ``embeddings`` (cosine geometry: rows L2-normalised first) by
    ``method`` ("tsne" or "umap", seeded)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.shape[0] < 4:
        raise ValueError(f"a map needs at least 4 images, got {x.shape[0]}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "umap":
        import umap

        neighbours = min(15, x.shape[0] - 1)
        return umap.UMAP(n_neighbors=neighbours, random_state=seed).fit_transform(x).astype(np.float64)
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (x.shape[0] - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def map_figure(coordinates: np.ndarray, labels: Optional[np.ndarray], classes: List[str], title: str):
    """A matplotlib Figure (FIGURE_INCHES square at FIGURE_DPI) of the points, one colour per class (tab10 up to 10
    classes, tab20 up to 20, a continuous map beyond) with a legend up to MAX_LEGEND_CLASSES; one colour without
    labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(FIGURE_INCHES, FIGURE_INCHES), dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    size = 12 if coordinates.shape[0] <= 2000 else 4
    if labels is None:
        ax.scatter(coordinates[:, 0], coordinates[:, 1], s=size, color="tab:blue", linewidths=0)
    else:
        colours = class_colours(len(classes))
        for index in np.unique(labels):
            points = coordinates[labels == index]
            name = classes[index] if index < len(classes) else str(index)
            ax.scatter(points[:, 0], points[:, 1], s=size, color=colours[index], label=name, linewidths=0)
        if len(classes) <= MAX_LEGEND_CLASSES:
            ax.legend(loc="best", fontsize="small", markerscale=2, framealpha=0.8)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return figure


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 3) RGB in [0, 1]: tab10 or tab20's colours, or evenly spaced hues beyond 20 classes."""
    from matplotlib import colormaps

    if num_classes <= 10:
        return np.asarray(colormaps["tab10"].colors)[:num_classes, :3]
    if num_classes <= 20:
        return np.asarray(colormaps["tab20"].colors)[:num_classes, :3]
    return colormaps["hsv"](np.linspace(0, 1, num_classes, endpoint=False))[:, :3]
