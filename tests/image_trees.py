"""Mock image trees for the data tests, made of tiny files: Tiny ImageNet, ImageNet style, flat and nested
unlabelled folders. Each image is one flat colour taken from its class (``class_colour``), so a test can check that
every decoded image carries its own label."""

import os


def class_colour(index: int):
    """A colour per class index, far apart from the others' in at least one channel (JPEG keeps it within ~6)."""
    return (40 + 50 * (index % 4), 40 + 50 * ((index // 4) % 4), 220 - 60 * (index % 3))


def write_image(path, colour, size=(12, 10), fmt=None):
    """A flat ``colour`` image of ``size`` (width, height); the format from the name (or ``fmt``)."""
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, tuple(int(c) for c in colour)).save(path, format=fmt)


def tiny_imagenet(root, wnids=("n01443537", "n01629819", "n01641577"), per_class=3, val_order=None):
    """train/<wnid>/images/<wnid>_<i>.JPEG (+ boxes.txt), val/images/val_<i>.JPEG with val_annotations.txt (the
    classes in ``val_order``, default a shuffle), test/images/ (unlabelled: never read). Returns the val labels."""
    root = str(root)
    for index, wnid in enumerate(wnids):
        for i in range(per_class):
            write_image(f"{root}/train/{wnid}/images/{wnid}_{i}.JPEG", class_colour(index), fmt="JPEG")
        with open(f"{root}/train/{wnid}/{wnid}_boxes.txt", "w") as f:
            f.write(f"{wnid}_0.JPEG\t0\t0\t5\t5\n")
    val_order = list(val_order) if val_order is not None else [wnids[k % len(wnids)] for k in (2, 0, 1, 1, 2, 0, 0)]
    os.makedirs(f"{root}/val/images", exist_ok=True)
    with open(f"{root}/val/val_annotations.txt", "w") as f:
        for i, wnid in enumerate(val_order):
            colour = class_colour(wnids.index(wnid)) if wnid in wnids else (0, 0, 0)
            write_image(f"{root}/val/images/val_{i}.JPEG", colour, fmt="JPEG")
            f.write(f"val_{i}.JPEG\t{wnid}\t0\t0\t8\t8\n")
    write_image(f"{root}/test/images/test_0.JPEG", (0, 0, 0), fmt="JPEG")
    with open(f"{root}/wnids.txt", "w") as f:
        f.write("\n".join(wnids) + "\n")
    return val_order


def imagenet_style(root, train_classes=("cat", "dog", "fox"), val_classes=None, per_class=2, val_folder="val"):
    """train/<class>/<i>.png and val/<class>/<i>.jpg (classes ``val_classes``, default the training ones)."""
    root = str(root)
    for index, name in enumerate(train_classes):
        for i in range(per_class):
            write_image(f"{root}/train/{name}/{i}.png", class_colour(index))
    everyone = list(train_classes) + [c for c in (val_classes or ()) if c not in train_classes]
    for name in val_classes if val_classes is not None else train_classes:
        for i in range(per_class):
            write_image(f"{root}/{val_folder}/{name}/{i}.jpg", class_colour(everyone.index(name)))


def mean_colour(images, index):
    return images[index].float().mean((0, 1))
