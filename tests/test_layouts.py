"""The standard image trees read right (empssl.data.layouts): Tiny ImageNet's val/images with val_annotations.txt,
ImageNet-style train/ and val/, the ImageNet-100 subset, unlabelled folders; test splits with unknown classes and
ambiguous layouts refused, saying what was found and what was expected."""

import os

import pytest
import torch
from image_trees import class_colour, imagenet_style, mean_colour, tiny_imagenet, write_image

from empssl import cli
from empssl.data.dataset import DataError
from empssl.data.layouts import imagenet100_classes, list_images
from empssl.data.load import load_dataset


def _check_colours(images, labels, classes, colour_of_class):
    """Every image's flat colour is its label's class colour: the label belongs to that very image."""
    for index, label in enumerate(labels.tolist()):
        expected = torch.tensor(colour_of_class(classes[label]), dtype=torch.float32)
        assert (mean_colour(images, index) - expected).abs().max() < 8, (index, classes[label])


@pytest.mark.parametrize("spec", ["tinyimagenet", "folder"])
def test_tiny_imagenet_test_labels_are_the_annotations_classes(tmp_path, spec):
    wnids = ("n01443537", "n01629819", "n01641577")
    val_order = tiny_imagenet(tmp_path, wnids)
    data = load_dataset(f"{spec}:{tmp_path}", image_size=8, show_progress=False)
    assert data.classes == sorted(wnids) and "Tiny ImageNet" in data.layout
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # val_<i>.JPEG is listed in file-name order: its label is the class its annotation line names
    assert [data.classes[label] for label in data.test_labels.tolist()] == val_order
    colour = lambda wnid: class_colour(wnids.index(wnid))  # noqa: E731
    _check_colours(data.train_images, data.train_labels, data.classes, colour)
    _check_colours(data.test_images, data.test_labels, data.classes, colour)
    assert data.recipe_patch_size == 8  # the recipe's 64, but never beyond the stored size


def test_tiny_imagenet_defaults_store_64_pixel_images(tmp_path):
    tiny_imagenet(tmp_path, per_class=1)
    data = load_dataset(f"tinyimagenet:{tmp_path}", show_progress=False)
    assert data.image_size == (64, 64) and data.recipe_patch_size == 64


def test_an_imagenet_tree_labels_by_class_folder(tmp_path):
    imagenet_style(tmp_path, ("n02", "n01", "n03"), per_class=2)
    data = load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    assert data.classes == ["n01", "n02", "n03"] and "ImageNet style" in data.layout
    assert data.train_labels.tolist() == [0, 0, 1, 1, 2, 2] and data.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    made_order = ["n02", "n01", "n03"]
    colour = lambda name: class_colour(made_order.index(name))  # noqa: E731
    _check_colours(data.train_images, data.train_labels, data.classes, colour)
    _check_colours(data.test_images, data.test_labels, data.classes, colour)


def test_a_val_split_may_lack_training_classes_but_never_hold_new_ones(tmp_path):
    imagenet_style(tmp_path / "fewer", ("a", "b", "c"), val_classes=("a", "c"))
    data = load_dataset(f"folder:{tmp_path / 'fewer'}", image_size=8, show_progress=False)
    assert data.classes == ["a", "b", "c"] and sorted(set(data.test_labels.tolist())) == [0, 2]
    imagenet_style(tmp_path / "more", ("a", "b"), val_classes=("a", "b", "zebra", "yak"))
    with pytest.raises(DataError, match="test split holds 2 class.* training split does not have: yak, zebra"):
        load_dataset(f"folder:{tmp_path / 'more'}", image_size=8, show_progress=False)
    assert not (tmp_path / "more" / ".empssl_cache").exists()  # refused before anything was decoded


def test_tiny_imagenet_annotations_naming_unknown_or_missing_files_are_refused(tmp_path):
    tiny_imagenet(tmp_path / "unknown", val_order=["n01443537", "n09999999"])
    with pytest.raises(DataError, match="training split does not have: n09999999"):
        list_images("tinyimagenet", str(tmp_path / "unknown"))
    tiny_imagenet(tmp_path / "short")
    os.remove(tmp_path / "short" / "val" / "images" / "val_3.JPEG")
    with pytest.raises(DataError, match="names 1 image.* missing from val/images .*val_3.JPEG"):
        list_images("tinyimagenet", str(tmp_path / "short"))
    write_image(tmp_path / "short" / "val" / "images" / "extra.JPEG", (1, 2, 3), fmt="JPEG")
    os.remove(tmp_path / "unknown" / "val" / "val_annotations.txt")  # the original failure: images/ read as a class
    with pytest.raises(DataError, match="no .*val_annotations.txt to label them: expected the Tiny ImageNet layout"):
        list_images("folder", str(tmp_path / "unknown"))
    with pytest.raises(DataError, match="no line for 1 image.*extra.JPEG"):
        list_images("tinyimagenet", str(tmp_path / "short"))
    with pytest.raises(DataError, match="expected the Tiny ImageNet layout"):
        list_images("tinyimagenet", str(tmp_path / "unknown" / "train"))


@pytest.mark.parametrize(
    "make, found, expected",
    [
        ("flat_val", "val holds 2 images directly but no class folders and no val_annotations.txt", "val/<class>/"),
        ("loose_val", "val holds 1 image directly beside the class folders", "only val/<class>/\\* folders"),
        ("top_and_classes", "holds 1 image at its top and 4 images in the subfolders", "unlabelled:"),
        ("no_val", "has train/ but neither val/ nor test/", "val/<class>/"),
    ],
)
def test_an_ambiguous_or_incomplete_layout_says_what_was_found_and_expected(tmp_path, capsys, make, found, expected):
    if make == "flat_val":
        imagenet_style(tmp_path, ("a",))
        for i in range(2):
            write_image(tmp_path / "val" / f"loose{i}.jpg", (9, 9, 9))
        for name in os.listdir(tmp_path / "val"):
            if os.path.isdir(tmp_path / "val" / name):
                for file in os.listdir(tmp_path / "val" / name):
                    os.remove(tmp_path / "val" / name / file)
                os.rmdir(tmp_path / "val" / name)
    elif make == "loose_val":
        imagenet_style(tmp_path, ("a", "b"))
        write_image(tmp_path / "val" / "loose.jpg", (9, 9, 9))
    elif make == "top_and_classes":
        imagenet_style(tmp_path / "x", ("a", "b"))
        os.rename(tmp_path / "x" / "train", tmp_path / "tree")
        write_image(tmp_path / "tree" / "top.png", (9, 9, 9))
        tmp_path = tmp_path / "tree"
    else:
        imagenet_style(tmp_path, ("a",))
        os.rename(tmp_path / "val", tmp_path / "elsewhere")
    code = cli.main(["train", "--dataset", f"folder:{tmp_path}", "--device", "cpu", "--out-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    where = f"{tmp_path / 'val'} holds" if found.startswith("val holds") else str(tmp_path)  # the folder, by its path
    assert found.replace("val holds", f"{tmp_path / 'val'} holds") in err[0] and where in err[0]
    assert expected.replace("\\", "") in err[0]


def test_imagenet100_takes_cmcs_100_classes_out_of_an_imagenet_tree(tmp_path):
    wanted = imagenet100_classes()
    assert len(wanted) == len(set(wanted)) == 100 and wanted[:2] == ["n02869837", "n01749939"]  # CMC's order
    for split in ("train", "val"):
        for wnid in wanted + ["n99999999"]:  # one ImageNet-1k class beyond the 100
            write_image(tmp_path / split / wnid / f"{wnid}_0.JPEG", (1, 2, 3), size=(2, 2), fmt="JPEG")
    listing = list_images("imagenet100", str(tmp_path))
    assert listing.classes == sorted(wanted) and len(listing.splits["train"]) == len(listing.splits["test"]) == 100
    assert all(os.path.basename(os.path.dirname(file)) == name for file, name in listing.splits["test"])
    assert listing.defaults.patch_size == 224 and listing.defaults.max_aspect == pytest.approx(4 / 3)
    for file in os.listdir(tmp_path / "val" / wanted[5]):
        os.remove(tmp_path / "val" / wanted[5] / file)
    os.rmdir(tmp_path / "val" / wanted[5])
    with pytest.raises(DataError, match=f"lacks 1 of the 100 ImageNet-100 classes \\({wanted[5]}\\)"):
        list_images("imagenet100", str(tmp_path))


def test_imagenet100_defaults_upsample_a_patch_at_most_1_15x_and_never_on_a_4_3_image():
    """What docs/training.md states of the ImageNet-100 storage, measured on the recipe's crop sampler: a crop is
    at least 194 stored pixels on a side (98% of them below 224 on a square image), and 224 on a 4:3 image."""
    from empssl.augment.config import AugmentConfig
    from empssl.augment.crops import sample_crop_boxes

    defaults = list_images.__globals__["LAYOUT_DEFAULTS"]["imagenet100"]
    recipe = AugmentConfig.imagenet()
    short, patch = defaults.image_size, defaults.patch_size
    long = int(short * defaults.max_aspect)  # 597: the longest image kept whole
    for width, least, share in ((short, 194, 0.98), (long, 224, 0.0)):
        boxes = sample_crop_boxes(
            20000, short, width, recipe.crop_scale, recipe.crop_ratio, torch.Generator().manual_seed(0)
        )
        sides = torch.minimum(boxes[:, 2], boxes[:, 3])
        assert sides.min() == least and patch / sides.min() <= 1.155
        assert float((sides < patch).double().mean()) == pytest.approx(share, abs=0.01)


def test_unlabelled_folders_train_and_eval_says_it_needs_labels(tmp_path, capsys):
    for i in range(12):
        write_image(tmp_path / "flat" / f"{i}.png", (10 * i, 5, 5))
        write_image(tmp_path / "nested" / f"day{i % 3}" / "deeper" / f"{i}.jpg", (5, 10 * i, 5))
    flat = load_dataset(f"folder:{tmp_path / 'flat'}", image_size=8, show_progress=False)
    nested = load_dataset(f"unlabelled:{tmp_path / 'nested'}", image_size=8, show_progress=False)
    for data, count in ((flat, 12), (nested, 12)):
        assert not data.labelled and data.train_images.shape[0] == count and data.test_images.shape[0] == 0
        assert data.train_labels.tolist() == [-1] * count
    tiny = "--width 0.125 --hidden-dim 32 --z-dim 16 --num-patches 2 --batch-size 4 --max-steps 2".split()
    run = tmp_path / "run"
    args = ["--dataset", f"unlabelled:{tmp_path / 'nested'}", "--image-size", "8", "--device", "cpu", "--no-progress"]
    assert cli.main(["train", *args, *tiny, "--out-dir", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no labels" in err[0] and "evaluate on a labelled data set" in err[0]


def test_a_fifo_named_val_annotations_is_refused_without_blocking(tmp_path):
    import signal

    tiny_imagenet(tmp_path)
    os.unlink(tmp_path / "val" / "val_annotations.txt")
    os.mkfifo(tmp_path / "val" / "val_annotations.txt")

    def hung(*_):
        raise TimeoutError("reading the FIFO blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(ValueError, match="val_annotations.txt is a FIFO .named pipe., not a regular file"):
            list_images("folder", str(tmp_path))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_trees_train_size_draws_from_every_class_by_the_seed_and_decodes_only_those(tmp_path, monkeypatch):
    from empssl.data import folder as image_folder

    classes = tuple("abcdef")
    imagenet_style(tmp_path, classes, per_class=6)
    load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    stores = set((tmp_path / ".empssl_cache").iterdir())
    decoded = []
    real = image_folder.decode_image
    monkeypatch.setattr(image_folder, "decode_image", lambda file, *args: decoded.append(file) or real(file, *args))
    drawn = [
        load_dataset(f"folder:{tmp_path}", image_size=8, train_size=12, test_size=5, seed=seed, show_progress=False)
        for seed in (0, 0, 1)
    ]
    assert len(decoded) == 2 * (12 + 5)  # the drawn images alone; the same seed's again from its stores
    labels = drawn[0].train_labels
    assert len(labels) == 12 and len(drawn[0].test_labels) == 5 and drawn[0].classes == list(classes)
    assert len(set(labels.tolist())) >= 4  # the first 12 of the sorted listing would be 2 classes
    assert labels.tolist() == sorted(labels.tolist())  # kept in the tree's order
    assert torch.equal(drawn[1].train_images, drawn[0].train_images)
    assert not torch.equal(drawn[2].train_images, drawn[0].train_images)
    assert stores <= set((tmp_path / ".empssl_cache").iterdir())  # the whole tree's stores are no stale state


def test_a_class_tree_is_split_per_class_keeping_every_class_in_training(tmp_path):
    for name, count in (("cat", 1), ("dog", 10), ("fox", 20), ("owl", 2)):
        for i in range(count):
            write_image(tmp_path / name / f"{i}.png", (1, 2, 3))
    for seed in range(8):
        listing = list_images("folder", str(tmp_path), seed)  # a whole-tree split would hand cat to test sometimes
        test = [name for _, name in listing.splits["test"]]
        assert listing.classes == ["cat", "dog", "fox", "owl"]
        assert sorted(test) == ["dog", "fox", "fox"]  # a tenth of each class, rounded; owl's 0.2 rounds to none
    for name in ("dog", "fox"):
        for file in (tmp_path / name).iterdir():
            if file.name != "0.png":
                file.unlink()
    listing = list_images("folder", str(tmp_path), 0)  # no class large enough for its share: owl gives one
    assert [name for _, name in listing.splits["test"]] == ["owl"] and len(listing.splits["train"]) == 4
    (tmp_path / "owl" / "1.png").unlink()
    with pytest.raises(DataError, match="cannot split 4 images of 4 classes"):
        list_images("folder", str(tmp_path), 0)


def test_images_in_linked_folders_are_listed_once_and_a_link_cycle_ends(tmp_path):
    for i in range(3):
        write_image(tmp_path / "elsewhere" / f"{i}.png", (1, 2, 3))
    write_image(tmp_path / "photos" / "top.png", (1, 2, 3))
    (tmp_path / "photos" / "2023").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "photos" / "again").symlink_to(tmp_path / "elsewhere")  # the same folder twice: listed once
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "photos")  # a cycle back to the top
    (train,) = list_images("unlabelled", str(tmp_path / "photos")).splits.values()
    assert sorted(os.path.relpath(file, tmp_path / "photos") for file, _ in train) == [
        "2023/0.png",
        "2023/1.png",
        "2023/2.png",
        "top.png",
    ]
    for name in ("a", "b"):
        write_image(tmp_path / "tree" / name / "0.png", (1, 2, 3))
        (tmp_path / "tree" / name / "more").symlink_to(tmp_path / "elsewhere")  # inside class folders too
    listing = list_images("folder", str(tmp_path / "tree"))
    assert len(listing.splits["train"]) + len(listing.splits["test"]) == 2 * (1 + 3 + 1)  # with loop/top.png


def test_the_recipe_patch_of_a_folder_spec_is_its_detected_layouts_before_loading(tmp_path):
    from empssl.data.load import recipe_patch_size

    tiny_imagenet(tmp_path / "tiny", per_class=1)
    imagenet_style(tmp_path / "plain", ("a", "b"))
    assert recipe_patch_size(f"folder:{tmp_path / 'tiny'}") == 64 == recipe_patch_size(f"tinyimagenet:{tmp_path}")
    assert recipe_patch_size(f"folder:{tmp_path / 'tiny'}", 48) == 48  # never beyond the stored size
    assert recipe_patch_size(f"folder:{tmp_path / 'plain'}") == 32
    loaded = load_dataset(f"folder:{tmp_path / 'tiny'}", show_progress=False)
    assert loaded.recipe_patch_size == recipe_patch_size(f"folder:{tmp_path / 'tiny'}")
