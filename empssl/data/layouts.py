"""The standard layouts of image trees, listed before anything is decoded (docs/training.md section 2).

``list_images(kind, path, seed)`` gives a ``Listing``: the files of each split with their class names, the training
split's classes, the layout found (in words, for messages) and the layout's storage and patch sizes. Kinds:

- ``folder``: the layout is found from the tree: Tiny ImageNet (``train/<wnid>/images/*``, ``val/images/*`` with
  ``val/val_annotations.txt``), ImageNet style (``train/<class>/**`` with ``val/<class>/**`` or ``test/``), one
  ``<class>/**`` tree split deterministically per class (every class kept in training), or a flat folder of
  images (unlabelled);
- ``tinyimagenet``: the Tiny ImageNet layout, nothing else;
- ``imagenet100``: the 100 classes of ``imagenet100.txt`` (the list of CMC, used by solo-learn and the EMP-SSL
  paper) out of an ImageNet-1k ``train/<wnid>`` and ``val/<wnid>`` tree;
- ``unlabelled``: every image under the folder, in any tree, without labels (training only).

A test split whose classes are not all classes of the training split is refused, naming the unknown ones (its
labels would index the wrong classes); a layout that reads two ways, or none, is refused saying what was found and
what was expected.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..files import open_input
from .dataset import DataError, deterministic_split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
KINDS = ("folder", "tinyimagenet", "imagenet100", "unlabelled")
TINY_ANNOTATIONS = "val_annotations.txt"
# CMC's list (github.com/HobbitLong/CMC, imagenet100.txt at commit bc687a26de7ae350d98f671d25d164b65336b8c2)
IMAGENET100_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet100.txt")

Entry = Tuple[str, Optional[str]]  # (file, class name; None: unlabelled)


@dataclasses.dataclass(frozen=True)
class StorageDefaults:
    """How a layout's images are stored and cut by default: the shorter side stored (``image_size``), the longest
    aspect ratio kept whole (``max_aspect``; 1: the centre square) and the patch size (at most the stored size;
    None: the stored size, up to ``MAX_DEFAULT_PATCH``)."""

    image_size: int = 32
    max_aspect: float = 1.0
    patch_size: Optional[int] = None


# ImageNet: a 25%-area crop (aspect 3:4 to 4:3) of an image stored at a shorter side of 448 is at least
# 224 * sqrt(3/4) = 194 pixels on a side (on a square image), so a 224-pixel patch is upsampled at most 1.15x; an
# image kept whole up to 4:3 gives 224 on a 4:3 image (docs/training.md section 2)
LAYOUT_DEFAULTS = {
    "tinyimagenet": StorageDefaults(64, 1.0, 64),
    "imagenet100": StorageDefaults(448, 4 / 3, 224),
}


@dataclasses.dataclass
class Listing:
    """The files of a tree by split (``train``, and ``test`` unless unlabelled), before decoding."""

    kind: str
    path: str
    layout: str
    splits: Dict[str, List[Entry]]
    classes: List[str]  # the training split's, sorted; [] for unlabelled images
    defaults: StorageDefaults = StorageDefaults()
    seeded_split: bool = False  # whether the seed chose the split (one <class>/ tree)
    drawn: str = ""  # the subsets ``draw`` took ("" for whole splits)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def draw(self, sizes: Dict[str, Optional[int]], seed: int) -> "Listing":
        """At most ``sizes[split]`` images of each split (None: all), drawn at random by ``seed`` from the whole
        split (every class in its share, never the first classes of the sorted listing) and kept in the tree's
        order; the classes stay the whole training split's."""
        splits, drawn = dict(self.splits), []
        for number, (split, size) in enumerate(sizes.items()):
            if size is not None and size <= 0:
                raise ValueError(f"{split}_size must be positive, got {size}")
            entries = self.splits.get(split, [])
            if size is None or size >= len(entries):
                continue
            keep = np.sort(np.random.default_rng((seed, number)).choice(len(entries), size, replace=False))
            splits[split] = [entries[k] for k in keep]
            drawn.append(f"{split} {size} of {len(entries)}")
        if not drawn:
            return self
        return dataclasses.replace(self, splits=splits, drawn=f"{', '.join(drawn)} drawn by seed {seed}")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _unreadable(err: OSError, what: str = "folder"):
    raise DataError(
        f"cannot read the {what} {err.filename} ({err.strerror or err}): its images would be left out; fix its "
        f"permissions, or move it out of the data set"
    ) from err


def _visible_folders(folder: str) -> List[str]:
    try:
        with os.scandir(folder) as listing:
            return sorted(d.name for d in listing if d.is_dir() and not d.name.startswith("."))
    except OSError as err:
        _unreadable(err)


def _image_files(folder: str) -> List[str]:
    """The files named like images directly in ``folder``, sorted (a FIFO or device among them is listed: decoding
    refuses it without opening it for reading, and names it)."""
    try:
        with os.scandir(folder) as listing:
            return sorted(os.path.join(folder, d.name) for d in listing if not d.is_dir() and _is_image(d.name))
    except OSError as err:
        _unreadable(err)


def _images_below(folder: str, what: str = "folder") -> List[str]:
    """Every file named like an image under ``folder`` (any depth, through links to folders; hidden folders such as
    .empssl_cache skipped), sorted; a folder reached twice (a link to one already listed, or to an ancestor) is
    listed once. A folder that cannot be read is an error naming it (``what``: the word for it), never a class
    silently left out."""
    found = []
    try:
        seen = {_identity(folder)}
    except OSError as err:
        _unreadable(err, what)
    for dirpath, dirnames, filenames in os.walk(folder, onerror=lambda err: _unreadable(err, what), followlinks=True):
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            try:
                identity = _identity(os.path.join(dirpath, name))
            except OSError as err:
                _unreadable(err, what)
            if identity not in seen:
                seen.add(identity)
                kept.append(name)
        dirnames[:] = kept
        found += [os.path.join(dirpath, name) for name in sorted(filenames) if _is_image(name)]
    return found


def _identity(folder: str) -> Tuple[int, int]:
    info = os.stat(folder)  # through a link: the folder it names
    return info.st_dev, info.st_ino


def _class_tree(folder: str, classes: Optional[List[str]] = None) -> List[Entry]:
    """(file, class) of every image under folder/<class>/ (any depth below the class), sorted; ``classes``: only
    these class folders."""
    names = _visible_folders(folder) if classes is None else classes
    return [(file, name) for name in names for file in _images_below(os.path.join(folder, name), "class folder")]


def _count(entries) -> str:
    return f"{len(entries)} image{'s' if len(entries) != 1 else ''}"


def _names(values, limit: int = 5) -> str:
    values = sorted(values)
    shown = ", ".join(values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def check_test_classes(listing: Listing) -> None:
    """DataError naming the test split's classes that the training split does not have."""
    known = set(listing.classes)
    unknown = {name for _, name in listing.splits.get("test", []) if name not in known}
    if unknown:
        raise DataError(
            f"{listing.path} ({listing.layout}): the test split holds {len(unknown)} class(es) the training split "
            f"does not have: {_names(unknown)}; their images cannot be labelled with a training class: every class "
            f"of the test split must be one of the training split's"
        )


def _tiny_imagenet(path: str) -> Listing:
    """Tiny ImageNet: train/<wnid>/images/*, val/images/* labelled by val/val_annotations.txt (file, wnid, box)."""
    train_dir, val_dir = os.path.join(path, "train"), os.path.join(path, "val")
    annotations_file = os.path.join(val_dir, TINY_ANNOTATIONS)
    expected = (
        "expected the Tiny ImageNet layout: train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
    )
    missing = [p for p in (train_dir, os.path.join(val_dir, "images"), annotations_file) if not os.path.exists(p)]
    if missing:
        raise DataError(f"{path}: no {', '.join(missing)}; {expected}")
    train = _class_tree(train_dir)
    if not train:
        raise DataError(f"{train_dir} holds no images; {expected}")
    labels = {}
    binary = open_input(annotations_file, "the Tiny ImageNet annotations")  # a FIFO is refused, never read
    with io.TextIOWrapper(binary, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            fields = line.split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or not fields[1].strip():
                raise DataError(
                    f"{annotations_file} line {number} is not 'file<TAB>wnid<TAB>...': {line.strip()[:80]!r}"
                )
            labels[fields[0].strip()] = fields[1].strip()
    files = _image_files(os.path.join(val_dir, "images"))
    unlabelled = [os.path.basename(file) for file in files if os.path.basename(file) not in labels]
    if unlabelled:
        raise DataError(
            f"{annotations_file} has no line for {len(unlabelled)} image(s) of val/images ({_names(unlabelled, 3)}): "
            f"every validation image needs its class"
        )
    present = {os.path.basename(file) for file in files}
    absent = [name for name in labels if name not in present]
    if absent:
        raise DataError(
            f"{annotations_file} names {len(absent)} image(s) missing from val/images ({_names(absent, 3)})"
        )
    if not files:
        raise DataError(f"{os.path.join(val_dir, 'images')} holds no images; {expected}")
    test = [(file, labels[os.path.basename(file)]) for file in files]
    classes = sorted({name for _, name in train})
    layout = "Tiny ImageNet (train/<wnid>/images, val/images with val_annotations.txt)"
    return Listing(
        "tinyimagenet", path, layout, {"train": train, "test": test}, classes, LAYOUT_DEFAULTS["tinyimagenet"]
    )


def imagenet100_classes() -> List[str]:
    """The 100 ImageNet-1k wnids of ImageNet-100 (CMC's list, shipped as empssl/data/imagenet100.txt)."""
    with open(IMAGENET100_FILE) as f:
        return [line.strip() for line in f if line.strip()]


def _imagenet100(path: str) -> Listing:
    wanted = imagenet100_classes()
    splits = {}
    for split, folder_name in (("train", "train"), ("test", "val")):
        folder = os.path.join(path, folder_name)
        if not os.path.isdir(folder):
            raise DataError(
                f"{path}: no {folder_name}/; expected an ImageNet-1k tree: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
                f"(the validation images sorted into class folders, e.g. by the devkit's valprep script)"
            )
        missing = [wnid for wnid in wanted if not os.path.isdir(os.path.join(folder, wnid))]
        if missing:
            loose = len(_image_files(folder))
            hint = f"; it holds {loose} images directly, not in class folders" if loose else ""
            raise DataError(
                f"{folder} lacks {len(missing)} of the 100 ImageNet-100 classes ({_names(missing)}){hint}; expected "
                f"{folder_name}/<wnid>/ for every wnid of {IMAGENET100_FILE}"
            )
        splits[split] = _class_tree(folder, wanted)
        if not splits[split]:
            raise DataError(f"{folder}: the 100 ImageNet-100 class folders hold no images")
    layout = "ImageNet-100 (CMC's 100 classes of an ImageNet-1k train/ and val/ tree)"
    return Listing("imagenet100", path, layout, splits, sorted(wanted), LAYOUT_DEFAULTS["imagenet100"])


def _unlabelled(path: str) -> Listing:
    files = _images_below(path)
    if not files:
        raise DataError(f"{path} holds no images (.png, .jpg, ...) at any depth")
    return Listing("unlabelled", path, "unlabelled images (any tree)", {"train": [(f, None) for f in files]}, [])


def _split_tree(path: str, train_dir: str, test_dir: str) -> Listing:
    """train/<class>/** with val/ (or test/) <class>/**: ImageNet style."""
    loose = _image_files(test_dir)
    folders = _visible_folders(test_dir)
    name = os.path.basename(test_dir)
    if loose and not folders:
        raise DataError(
            f"{test_dir} holds {_count(loose)} directly but no class folders and no {TINY_ANNOTATIONS}: its classes "
            f"are unknown; expected {name}/<class>/* (ImageNet style) or {name}/images/* with "
            f"{name}/{TINY_ANNOTATIONS} (Tiny ImageNet)"
        )
    if loose:
        raise DataError(
            f"{test_dir} holds {_count(loose)} directly beside the class folders {_names(folders, 3)}: the loose "
            f"images have no class; expected only {name}/<class>/* folders"
        )
    train = _class_tree(train_dir)
    splits = {"train": train, "test": _class_tree(test_dir)}
    for split, folder in (("train", train_dir), ("test", test_dir)):
        if not splits[split]:
            raise DataError(f"image folder {folder} holds no images (expected {folder}/<class>/*.png|jpg)")
    layout = f"ImageNet style (train/<class>, {name}/<class>)"
    return Listing("folder", path, layout, splits, sorted({c for _, c in train}))


def _is_tiny_imagenet(path: str) -> bool:
    """Whether a ``folder:`` tree is read as Tiny ImageNet: train/, val/images/ and val/val_annotations.txt."""
    val_dir = os.path.join(path, "val")
    return (
        os.path.isdir(os.path.join(path, "train"))
        and os.path.isdir(os.path.join(val_dir, "images"))
        and os.path.exists(os.path.join(val_dir, TINY_ANNOTATIONS))
    )


def layout_defaults(kind: str, path: str) -> Optional[StorageDefaults]:
    """The storage defaults of the tree ``kind:path`` where its layout has its own (None: the plain defaults), from
    a few names alone (nothing listed): a ``folder:`` tree in the Tiny ImageNet layout takes Tiny ImageNet's."""
    return LAYOUT_DEFAULTS.get("tinyimagenet" if kind == "folder" and _is_tiny_imagenet(path) else kind)


def _detect(path: str, seed: int) -> Listing:
    """The layout of a ``folder:`` tree, found from what it holds."""
    train_dir = os.path.join(path, "train")
    if _is_tiny_imagenet(path):
        return _tiny_imagenet(path)
    if os.path.isdir(train_dir):
        val_dir = os.path.join(path, "val")
        if os.path.isdir(os.path.join(val_dir, "images")):
            if not [d for d in _visible_folders(val_dir) if d != "images"]:
                raise DataError(
                    f"{val_dir}/images holds the validation images but there is no {val_dir}/{TINY_ANNOTATIONS} to "
                    f"label them: expected the Tiny ImageNet layout (val/images/* with val/{TINY_ANNOTATIONS}) or "
                    f"ImageNet style (val/<class>/*)"
                )
        test_dir = next((os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None)
        if test_dir is None:
            raise DataError(
                f"image folder {path} has train/ but neither val/ nor test/ (expected train/<class>/* with "
                f"val/<class>/* or test/<class>/*)"
            )
        return _split_tree(path, train_dir, test_dir)
    loose, folders = _image_files(path), _visible_folders(path)
    entries = _class_tree(path)
    if loose and entries:
        raise DataError(
            f"image folder {path} holds {_count(loose)} at its top and {_count(entries)} in the subfolders "
            f"{_names(folders, 3)}: read as a class tree the top images have no class, read as unlabelled the "
            f"subfolders' classes are lost. Move the top images into class folders, or pass unlabelled:{path} to "
            f"train on all of them without labels"
        )
    if loose:
        return Listing("folder", path, "a flat folder of unlabelled images", {"train": [(f, None) for f in loose]}, [])
    if not entries:
        raise DataError(
            f"image folder {path} holds no images (expected {path}/train/<class>/*, "
            f"{path}/val/<class>/* or {path}/<class>/*.png|jpg)"
        )
    train_idx, test_idx = deterministic_split(len(entries), seed=seed, classes=[name for _, name in entries])
    splits = {"train": [entries[i] for i in train_idx], "test": [entries[i] for i in test_idx]}
    classes = sorted({c for _, c in splits["train"]})
    return Listing("folder", path, "one <class>/ tree, split deterministically", splits, classes, seeded_split=True)


def list_images(kind: str, path: str, seed: int = 0) -> Listing:
    """The ``Listing`` of the tree at ``path`` read as ``kind`` (one of ``KINDS``); DataError for a tree that is
    missing, empty, ambiguous, or whose test split has classes the training split lacks."""
    if kind not in KINDS:
        raise ValueError(f"unknown image tree kind {kind!r}; expected one of {KINDS}")
    if not os.path.isdir(path):
        raise DataError(f"image folder {path} not found")
    listing = {"tinyimagenet": _tiny_imagenet, "imagenet100": _imagenet100, "unlabelled": _unlabelled}.get(kind)
    listing = listing(path) if listing else _detect(path, seed)
    if listing.labelled:
        check_test_classes(listing)
    return listing
