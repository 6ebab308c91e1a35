"""Data sets -> uint8 tensors: synthetic, CIFAR pickles, ImageFolder with cache, npz; clear errors."""

import os
import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from empssl.data import folder as image_folder
from empssl.data.dataset import DataError, check_batch_size
from empssl.data.load import load_dataset
from empssl.data.synthetic import SYNTHETIC_CLASSES, make_synthetic
from empssl.files import check_writable_folder

# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_labelled_and_varied():
    first = make_synthetic(300, 100, 16, seed=3)
    again = make_synthetic(300, 100, 16, seed=3)
    other = make_synthetic(300, 100, 16, seed=4)
    assert first.train_images.shape == (300, 16, 16, 3) and first.train_images.dtype == torch.uint8
    assert first.test_images.shape == (100, 16, 16, 3)
    assert first.train_labels.dtype == torch.int64 and first.num_classes == 10
    assert torch.equal(first.train_images, again.train_images) and torch.equal(first.test_labels, again.test_labels)
    assert not torch.equal(first.train_images, other.train_images)
    assert set(first.train_labels.tolist()) == set(range(10))
    # train and test are different images, and images differ from each other
    assert not torch.equal(first.train_images[:100], first.test_images)
    assert first.train_images.float().std(dim=(1, 2, 3)).min() > 5


def test_synthetic_classes_differ_in_structure_not_only_colour():
    # per-class mean of the horizontal vs vertical gradient energy separates the stripe classes
    dataset = make_synthetic(2000, 10, 32, seed=0)
    gray = dataset.train_images.float().mean(-1)
    horizontal_edges = (gray[:, 1:, :] - gray[:, :-1, :]).abs().mean((1, 2))  # change along y
    vertical_edges = (gray[:, :, 1:] - gray[:, :, :-1]).abs().mean((1, 2))  # change along x
    labels = dataset.train_labels
    h = SYNTHETIC_CLASSES.index("stripes_horizontal")
    v = SYNTHETIC_CLASSES.index("stripes_vertical")
    assert (horizontal_edges[labels == h] > vertical_edges[labels == h]).float().mean() > 0.95
    assert (vertical_edges[labels == v] > horizontal_edges[labels == v]).float().mean() > 0.95


def test_load_dataset_synthetic_sizes_and_device():
    dataset = load_dataset("synthetic", train_size=50, test_size=20, image_size=8, device="cpu")
    assert dataset.train_images.shape == (50, 8, 8, 3) and dataset.test_images.shape == (20, 8, 8, 3)


def test_unknown_spec_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset spec 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown dataset spec 'folder:'"):
        load_dataset("folder:")
    with pytest.raises(ValueError, match="on_bad_image"):
        load_dataset("synthetic", on_bad_image="ignore")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("cifar10", image_size=64)


def test_check_batch_size():
    check_batch_size(10, 10)
    with pytest.raises(ValueError, match="batch_size 11 is larger than the training set \\(10 images\\)"):
        check_batch_size(11, 10)
    with pytest.raises(ValueError, match="positive"):
        check_batch_size(0, 10)


# ----------------------------------------------------------------------------- CIFAR


def _write_cifar_batch(path, images, labels, label_key):
    # the real layout: rows of 3072 bytes, R plane then G then B, each row-major 32x32; str keys,
    # as the Python 2 pickles read with encoding="latin1" give
    entry = {
        "batch_label": "test",
        label_key: list(map(int, labels)),
        "data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
        "filenames": ["x.png"] * len(images),
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _accept_fake_files(monkeypatch, source, folder):
    """Give torchvision's CIFAR class the MD5s of the fake files (it checks every file against its record)."""
    from torchvision.datasets.utils import calculate_md5

    def record(name):
        return [name, calculate_md5(str(folder / name))]

    monkeypatch.setattr(source, "train_list", [record(name) for name, _ in source.train_list])
    monkeypatch.setattr(source, "test_list", [record(name) for name, _ in source.test_list])
    monkeypatch.setattr(source, "meta", dict(source.meta, md5=record(source.meta["filename"])[1]))


def _fake_cifar10(root, rng, monkeypatch, per_batch=4):
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch)
        _write_cifar_batch(folder / name, images, labels, "labels")
        written["test" if name == "test_batch" else "train"].append((images, labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f, protocol=2)
    _accept_fake_files(monkeypatch, CIFAR10, folder)
    return {
        split: (np.concatenate([w[0] for w in parts]), np.concatenate([w[1] for w in parts]))
        for split, parts in written.items()
    }


def test_cifar10_reader_matches_pickle_layout(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    written = _fake_cifar10(tmp_path, rng, monkeypatch)
    dataset = load_dataset("cifar10", root=str(tmp_path))
    assert dataset.train_images.shape == (20, 32, 32, 3) and dataset.test_images.shape == (4, 32, 32, 3)
    assert np.array_equal(dataset.train_images.numpy(), written["train"][0])
    assert np.array_equal(dataset.train_labels.numpy(), written["train"][1])
    assert np.array_equal(dataset.test_images.numpy(), written["test"][0])
    # one pixel by hand: channel c at (row, col) is byte c*1024 + row*32 + col of the row
    raw = pickle.load(open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb"), encoding="latin1")["data"]
    assert dataset.train_images[1, 5, 7, 2] == raw[1, 2 * 1024 + 5 * 32 + 7]
    assert dataset.classes[:2] == ["c0", "c1"] and dataset.train_labels.dtype == torch.int64
    assert dataset.subset(train_size=6).train_images.shape[0] == 6


def test_cifar100_reader_uses_fine_labels(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    rng = np.random.default_rng()
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    fine = rng.integers(0, 100, 6)
    for name in ("train", "test"):
        entry = {
            "data": images.transpose(0, 3, 1, 2).reshape(6, 3072),
            "fine_labels": list(map(int, fine)),
            "coarse_labels": [0] * 6,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f, protocol=2)
    _accept_fake_files(monkeypatch, CIFAR100, folder)
    dataset = load_dataset("cifar100", root=str(tmp_path))
    assert np.array_equal(dataset.train_labels.numpy(), fine) and dataset.num_classes == 100
    assert np.array_equal(dataset.test_images.numpy(), images) and dataset.classes[99] == "f99"


def test_corrupt_cifar_batch_names_the_file(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path, np.random.default_rng(), monkeypatch)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3 is corrupt"):
        load_dataset("cifar10", root=str(tmp_path))


def test_missing_cifar_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="--download"):
        load_dataset("cifar10", root=str(tmp_path))
    _fake_cifar10(tmp_path, np.random.default_rng(), monkeypatch)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_4")
    with pytest.raises(DataError, match="data_batch_4 not found; run with --download"):
        load_dataset("cifar10", root=str(tmp_path))


def test_download_without_network_says_so(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(DataError, match="network looks unreachable") as info:
        load_dataset("cifar10", root=str(tmp_path), download=True)
    assert "cifar-10-python.tar.gz" in str(info.value)
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_download_skipped_when_files_exist(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path, np.random.default_rng(), monkeypatch)

    def no_network(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert load_dataset("cifar10", root=str(tmp_path), download=True).train_images.shape[0] == 20


# ----------------------------------------------------------------------------- image folder


def _write_image(path, colour, size=(20, 12), fmt=None):
    from PIL import Image

    Image.new("RGB", size, tuple(int(c) for c in colour)).save(path, format=fmt)


def _make_tree(root, with_split=True):
    colours = {"apple": (200, 30, 30), "sky": (30, 60, 220)}
    splits = {"train": 3, "val": 2} if with_split else {"": 5}
    for split, count in splits.items():
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                ext = "png" if i % 2 == 0 else "jpg"
                _write_image(folder / f"{i}.{ext}", colour)
    return colours


def test_image_folder_decodes_caches_and_reuses(tmp_path, monkeypatch):
    colours = _make_tree(tmp_path)
    dataset = load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    assert dataset.train_images.shape == (6, 8, 8, 3) and dataset.test_images.shape == (4, 8, 8, 3)
    assert dataset.classes == ["apple", "sky"]
    for images, labels in ((dataset.train_images, dataset.train_labels), (dataset.test_images, dataset.test_labels)):
        for image, label in zip(images, labels):
            expected = torch.tensor(colours[dataset.classes[label]], dtype=torch.float32)
            assert (image.float().mean((0, 1)) - expected).abs().max() < 6  # JPEG is lossy
    cache = tmp_path / ".empssl_cache"
    assert len(list(cache.glob("*.train.empssl-store"))) == 1 and len(list(cache.glob("*.test.empssl-store"))) == 1
    assert not list(cache.glob("*.partial"))

    def must_not_decode(*args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(image_folder, "decode_image", must_not_decode)
    again = load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    assert torch.equal(again.train_images, dataset.train_images)


def test_image_folder_cache_rebuilt_when_a_file_changes(tmp_path):
    _make_tree(tmp_path)
    before = load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    changed = tmp_path / "train" / "apple" / "0.png"
    _write_image(changed, (10, 250, 10), size=(24, 24))
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    after = load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    index = [
        i for i in range(len(before.train_labels)) if not torch.equal(before.train_images[i], after.train_images[i])
    ]
    assert len(index) == 1 and after.train_images[index[0], 4, 4].tolist() == [10, 250, 10]
    assert len(list((tmp_path / ".empssl_cache").glob("*.train.empssl-store"))) == 1  # the stale store is gone


def test_image_folder_single_tree_split_is_deterministic(tmp_path):
    _make_tree(tmp_path, with_split=False)
    first = load_dataset(f"folder:{tmp_path}", image_size=8, cache_dir=str(tmp_path / "c1"), show_progress=False)
    second = load_dataset(f"folder:{tmp_path}", image_size=8, cache_dir=str(tmp_path / "c2"), show_progress=False)
    assert len(first.train_labels) + len(first.test_labels) == 10 and len(first.test_labels) == 1
    assert torch.equal(first.train_labels, second.train_labels) and torch.equal(first.test_images, second.test_images)


def test_undecodable_image_skipped_with_warning_or_error(tmp_path):
    _make_tree(tmp_path)
    bad = tmp_path / "train" / "sky" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.warns(UserWarning, match="broken.png"):
        dataset = load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    assert dataset.train_images.shape[0] == 6

    cache = tmp_path / "strict-cache"
    with pytest.raises(DataError, match="cannot decode image .*broken.png"):
        load_dataset(
            f"folder:{tmp_path}", image_size=8, on_bad_image="error", cache_dir=str(cache), show_progress=False
        )
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="neither val/ nor test/"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(f"folder:{tmp_path}")


# ----------------------------------------------------------------------------- npz


def test_npz_round_trip_with_and_without_test_split(tmp_path):
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 30)
    test_images = rng.integers(0, 256, (7, 12, 12, 3), dtype=np.uint8)
    test_labels = rng.integers(0, 4, 7)
    np.savez(tmp_path / "full.npz", images=images, labels=labels, test_images=test_images, test_labels=test_labels)
    dataset = load_dataset(f"npz:{tmp_path / 'full.npz'}")
    assert np.array_equal(dataset.train_images.numpy(), images) and np.array_equal(dataset.train_labels.numpy(), labels)
    assert np.array_equal(dataset.test_images.numpy(), test_images) and np.array_equal(
        dataset.test_labels.numpy(), test_labels
    )

    np.savez(tmp_path / "train_only.npz", images=images, labels=labels)
    split = load_dataset(f"npz:{tmp_path / 'train_only.npz'}")
    again = load_dataset(f"npz:{tmp_path / 'train_only.npz'}")
    assert torch.equal(split.test_images, again.test_images)
    assert len(split.train_labels) == 27 and len(split.test_labels) == 3
    together = torch.cat([split.train_images, split.test_images]).reshape(30, -1)
    original = torch.from_numpy(images).reshape(30, -1)
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, original.tolist()))


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 8, 8, 3), np.float32), labels=np.zeros(4))
    with pytest.raises(DataError, match="images must be uint8"):
        load_dataset(f"npz:{tmp_path / 'float.npz'}")
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="no array 'labels'"):
        load_dataset(f"npz:{tmp_path / 'nolabels.npz'}")
    (tmp_path / "garbage.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="garbage.npz is corrupt"):
        load_dataset(f"npz:{tmp_path / 'garbage.npz'}")
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(labels=20), r"30 images but labels of shape \(20,\)"),  # shorter: no IndexError later
        (dict(labels=31), r"30 images but labels of shape \(31,\)"),  # longer: no silent misalignment
        (dict(labels=30, test_images=5, test_labels=4), r"5 test_images but test_labels of shape \(4,\)"),
    ],
)
def test_npz_label_count_must_match_the_images(tmp_path, arrays, message):
    rng = np.random.default_rng()
    content = {"images": rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)}
    for key, count in arrays.items():
        content[key] = (
            rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
            if key.endswith("images")
            else rng.integers(0, 3, count)
        )
    np.savez(tmp_path / "bad.npz", **content)
    with pytest.raises(DataError, match=message):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_npz_image_size_is_refused_only_when_it_differs(tmp_path):
    images = np.random.default_rng().integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(10) % 2)
    same = load_dataset(f"npz:{tmp_path / 'd.npz'}", image_size=12)
    assert same.image_size == (12, 12)
    with pytest.raises(ValueError, match="holds 12x12 images, but image_size=16 .* pass 12"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}", image_size=16)
    with pytest.raises(DataError, match="missing.npz not found"):  # the missing file is named, not the size
        load_dataset(f"npz:{tmp_path / 'missing.npz'}", image_size=16)


def test_unusable_cache_dir_fails_before_decoding(tmp_path, monkeypatch):
    _make_tree(tmp_path / "tree")
    decoded = []
    monkeypatch.setattr(image_folder, "decode_image", lambda *args: decoded.append(args))
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match="--cache-dir .*a_file is a file, not a folder"):
        load_dataset(
            f"folder:{tmp_path / 'tree'}", image_size=8, cache_dir=str(tmp_path / "a_file"), show_progress=False
        )
    with pytest.raises(ValueError, match="a_file, which is a file"):
        load_dataset(
            f"folder:{tmp_path / 'tree'}",
            image_size=8,
            cache_dir=str(tmp_path / "a_file" / "cache"),
            show_progress=False,
        )
    with pytest.raises(ValueError, match="is not writable: cannot create files in /proc"):
        load_dataset(f"folder:{tmp_path / 'tree'}", image_size=8, cache_dir="/proc/empssl-cache", show_progress=False)
    assert decoded == [] and (tmp_path / "a_file").read_text() == "not a folder"
    assert not (tmp_path / "tree" / ".empssl_cache").exists()


def test_check_writable_folder_leaves_nothing_behind(tmp_path):
    check_writable_folder(str(tmp_path / "new" / "deeper"), "--out-dir")  # creatable: fine
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the probe file
