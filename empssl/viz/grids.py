"""Grids of images with a frame and a caption per cell, drawn with PIL (the neighbour and preview pictures).

``GridLayout`` fixes every pixel's place: cell (row, column) shows its image, scaled by an integer factor with
nearest-neighbour sampling (each source pixel a visible block), inside a frame of ``frame`` pixels, with a caption
strip below; ``separated`` columns are followed by a wider gap (the query or original column beside the rest).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import numpy as np

BACKGROUND = (255, 255, 255)
NEUTRAL = (160, 160, 160)  # a frame that says nothing
SAME = (40, 160, 60)  # a neighbour of the query's class
OTHER = (210, 50, 40)  # a neighbour of another class
MIN_CELL = 64  # pixels: small images are scaled up to at least this


def scale_for(image_size: int) -> int:
    """The integer factor that shows an image of ``image_size`` pixels at MIN_CELL pixels or more."""
    return max(1, math.ceil(MIN_CELL / image_size))


@dataclasses.dataclass(frozen=True)
class GridLayout:
    rows: int
    columns: int
    cell: int  # pixels of a cell's image
    frame: int = 3
    pad: int = 6
    caption: int = 14
    separated: Tuple[int, ...] = ()  # columns followed by a gap of 3 pads

    def image_origin(self, row: int, column: int) -> Tuple[int, int]:
        """(x, y) of the top-left pixel of cell (row, column)'s image."""
        gaps = sum(1 for c in self.separated if c < column)
        x = self.pad + column * (self.cell + 2 * self.frame + self.pad) + gaps * 2 * self.pad
        y = self.pad + row * (self.cell + 2 * self.frame + self.caption + self.pad)
        return x + self.frame, y + self.frame

    @property
    def size(self) -> Tuple[int, int]:
        x, y = self.image_origin(self.rows - 1, self.columns - 1)
        return x + self.cell + self.frame + self.pad, y + self.cell + self.frame + self.caption + self.pad


def scaled(image: np.ndarray, cell: int) -> np.ndarray:
    """An (H, W, 3) uint8 image at ``cell`` x ``cell`` pixels: repeated pixels when H = W divides ``cell``, else
    PIL's nearest-neighbour resize."""
    height, width = image.shape[:2]
    if height == width and cell % height == 0:
        factor = cell // height
        return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((cell, cell), Image.NEAREST))


def draw_grid(
    layout: GridLayout,
    images: Sequence[Sequence[np.ndarray]],
    frames: Optional[Sequence[Sequence[Tuple[int, int, int]]]] = None,
    captions: Optional[Sequence[Sequence[str]]] = None,
):
    """A PIL image of ``layout`` with ``images[row][column]`` (uint8 (H, W, 3)) in its cells, each framed in
    ``frames[row][column]`` (default NEUTRAL) with ``captions[row][column]`` below (cut to the cell's width)."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = np.full((layout.size[1], layout.size[0], 3), BACKGROUND, dtype=np.uint8)
    for row, row_images in enumerate(images):
        for column, image in enumerate(row_images):
            x, y = layout.image_origin(row, column)
            colour = frames[row][column] if frames else NEUTRAL
            f = layout.frame
            canvas[y - f : y + layout.cell + f, x - f : x + layout.cell + f] = colour
            canvas[y : y + layout.cell, x : x + layout.cell] = scaled(image, layout.cell)
    picture = Image.fromarray(canvas)
    if captions:
        draw, font = ImageDraw.Draw(picture), ImageFont.load_default()
        width = layout.cell + 2 * layout.frame
        for row, row_captions in enumerate(captions):
            for column, text in enumerate(row_captions):
                if not text:
                    continue
                x, y = layout.image_origin(row, column)
                while text and draw.textlength(text, font=font) > width:
                    text = text[:-1]
                draw.text((x - layout.frame, y + layout.cell + layout.frame + 1), text, fill=(0, 0, 0), font=font)
    return picture
