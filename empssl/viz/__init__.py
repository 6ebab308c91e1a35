"""Pictures of what an encoder learned (docs/training.md section 11): its embeddings of any images (``embed``), the
nearest neighbours of query images (``neighbours``), a 2-D map of the embeddings coloured by label (``maps``), and
the augmented patches the trainer cuts from a few images (``preview``). The ``empssl`` commands of the same names
(empssl.cli.pictures) draw them; each writes a PNG and the numbers behind it."""

from .common import ImageSet, embed, folder_images, split_images
from .embed import write_embeddings
from .maps import map_figure, two_d_map
from .neighbours import nearest_neighbours, neighbour_grid
from .preview import augmentation_preview

__all__ = [
    "ImageSet",
    "augmentation_preview",
    "embed",
    "folder_images",
    "map_figure",
    "nearest_neighbours",
    "neighbour_grid",
    "split_images",
    "two_d_map",
    "write_embeddings",
]
