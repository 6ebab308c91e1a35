"""The picture commands (empssl.viz, `empssl embed | neighbours | map | preview`): each PNG read back has the expected
grid, every cell showing the image or patch it should (computed here independently), the numbers beside it agree;
data without labels works; an output never replaces an input."""

import argparse
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import TINY

from empssl import cli
from empssl.augment.config import augment_config_for
from empssl.augment.multipatch import MultiPatchAugment
from empssl.cli.pictures import folder_storage
from empssl.config import TrainConfig
from empssl.data.synthetic import make_synthetic
from empssl.evaluation.features import SPLIT_KEYS, extract_features
from empssl.models.encoder import load_encoder
from empssl.training import loop as T
from empssl.viz.common import folder_images
from empssl.viz.grids import NEUTRAL, OTHER, SAME, GridLayout, scale_for
from empssl.viz.preview import PARAM_COLUMNS

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::empssl.training.monitor.CollapseWarning"),
]
TEST_SIZE = 24
RUNTIME = ["--device", "cpu", "--threads", "1", "--no-progress"]
SCALE = 8  # 8x8 images are drawn at 64x64 pixels


@pytest.fixture(scope="module")
def data():
    return make_synthetic(64, TEST_SIZE, 8, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("pictures") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return T.train(TrainConfig(**{**TINY, "lr": 0.05}, max_steps=3, out_dir=str(out))).checkpoint_path
    finally:
        torch.set_num_threads(threads)


def _run(*argv):
    threads = torch.get_num_threads()
    try:
        return cli.main(list(argv))
    finally:
        torch.set_num_threads(threads)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _picture(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _cell(picture, layout, row, column):
    x, y = layout.image_origin(row, column)
    return picture[y : y + layout.cell, x : x + layout.cell]


def _frame(picture, layout, row, column):
    x, y = layout.image_origin(row, column)
    return tuple(picture[y - 1, x - 1])


def _big(image):
    return np.repeat(np.repeat(image, SCALE, axis=0), SCALE, axis=1)


def test_preview_shows_the_trainers_patches_next_to_the_originals(tmp_path, data, capsys):
    out = str(tmp_path / "preview.png")
    argv = ["preview", "--dataset", "synthetic", "--image-size", "8", "--train-size", "64", "--test-size", "8"]
    assert _run(*argv, "--num-images", "3", "--num-patches", "4", "--step", "5", "--out", out, *RUNTIME) == 0
    assert "cut by the cpu backend on cpu (seed 0, step 5)" in capsys.readouterr().out
    rows = _rows(str(tmp_path / "preview.csv"))
    ids = torch.tensor(sorted({int(row["image"]) for row in rows}))
    assert len(ids) == 3 and len(rows) == 12
    # the patches the training step 5 cuts from these images (train_step's call), by the plain-PyTorch reference
    reference = MultiPatchAugment(augment_config_for(8), backend="reference")
    patches = reference(data.train_images[ids], 4, seed=0, step=torch.tensor(5), image_ids=ids)
    expected = (patches * 0.5 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    picture, layout = _picture(out), GridLayout(rows=3, columns=5, cell=64, separated=(0,))
    assert picture.shape == (layout.size[1], layout.size[0], 3)
    for j in range(3):
        assert np.array_equal(_cell(picture, layout, j, 0), _big(data.train_images[ids[j]].numpy()))
        for i in range(4):
            shown = _cell(picture, layout, j, i + 1).astype(int)
            assert np.abs(shown - _big(expected[i * 3 + j]).astype(int)).max() <= 1, (j, i)  # patch-major
            assert _frame(picture, layout, j, i + 1) == NEUTRAL
    flips = [float(row["flip"]) for row in rows]
    sampled = reference.sample(data.train_images[ids], 4, seed=0, step=5, image_ids=ids)[1]
    assert flips == [sampled[i * 3 + j, 4].item() for j in range(3) for i in range(4)]


def test_preview_of_a_checkpoint_cuts_with_the_runs_seed(tmp_path, data, capsys):
    checkpoint = T.train(TrainConfig(**TINY, seed=3, max_steps=1, out_dir=str(tmp_path / "run"))).checkpoint_path
    out = str(tmp_path / "preview.png")
    argv = ["preview", "--checkpoint", checkpoint, "--num-images", "2", "--num-patches", "2", "--step", "1"]
    for given, seed in (((), 3), (("--seed", "7"), 7)):  # the run's seed, unless --seed is given
        assert _run(*argv, *given, "--out", out, *RUNTIME) == 0
        assert f"(seed {seed}, step 1)" in capsys.readouterr().out
        rows = _rows(str(tmp_path / "preview.csv"))
        ids = torch.tensor(sorted({int(row["image"]) for row in rows}))
        sampled = MultiPatchAugment(augment_config_for(8), backend="reference").sample(
            data.train_images[ids], 2, seed=seed, step=1, image_ids=ids
        )[1]
        shown = [[float(row[column]) for column in PARAM_COLUMNS] for row in rows]
        assert shown == [sampled[i * 2 + j].tolist() for j in range(2) for i in range(2)]  # every patch's parameters


def test_neighbours_are_each_querys_nearest_by_embedding(tmp_path, data, checkpoint):
    out = str(tmp_path / "nb.png")
    argv = ["neighbours", "--checkpoint", checkpoint, "--test-size", str(TEST_SIZE), "--queries", "3", "--k", "4"]
    assert _run(*argv, "--num-patches", "2", "--out", out, *RUNTIME) == 0
    rows = _rows(str(tmp_path / "nb.csv"))
    queries = [int(rows[4 * q]["query_name"].split("/")[-1]) for q in range(3)]
    # eval's embeddings of the whole splits: a query's are those of its place in the test split
    encoder, _ = load_encoder(checkpoint)
    bank = extract_features(encoder, data.train_images, 2, bf16=False, seed=0, split_key=SPLIT_KEYS["train"])
    test = extract_features(encoder, data.test_images, 2, bf16=False, seed=0, split_key=SPLIT_KEYS["test"])
    similarity = torch.nn.functional.normalize(test[queries], dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top = similarity.topk(4, dim=1)
    picture, layout = _picture(out), GridLayout(rows=3, columns=5, cell=64, separated=(0,))
    assert picture.shape == (layout.size[1], layout.size[0], 3)
    for q, query in enumerate(queries):
        found = [int(row["neighbour"]) for row in rows[4 * q : 4 * q + 4]]
        assert found == top.indices[q].tolist()
        assert [float(row["similarity"]) for row in rows[4 * q : 4 * q + 4]] == pytest.approx(top.values[q].tolist())
        assert np.array_equal(_cell(picture, layout, q, 0), _big(data.test_images[query].numpy()))
        for rank, index in enumerate(found, 1):
            assert np.array_equal(_cell(picture, layout, q, rank), _big(data.train_images[index].numpy()))
            same = data.train_labels[index] == data.test_labels[query]
            assert _frame(picture, layout, q, rank) == (SAME if same else OTHER)


def _write_folder(root, images, classes=None):
    """PNG files of ``images`` under ``root`` (in class subfolders when ``classes`` is given); their paths."""
    paths = []
    for index, image in enumerate(images):
        folder = root / classes[index] if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(str(folder / f"img{index:02d}.png"))
        Image.fromarray(image.numpy()).save(paths[-1])
    return paths


def test_neighbours_and_embed_take_any_folder_of_images_without_labels(tmp_path, data, checkpoint):
    paths = _write_folder(tmp_path / "flat", data.test_images[:12])
    out = str(tmp_path / "nb.png")
    argv = ["neighbours", "--checkpoint", checkpoint, "--images", str(tmp_path / "flat"), "--queries", "2", "--k", "3"]
    assert _run(*argv, "--num-patches", "2", "--out", out, *RUNTIME) == 0
    rows, picture = _rows(str(tmp_path / "nb.csv")), _picture(out)
    layout = GridLayout(rows=2, columns=4, cell=64, separated=(0,))
    for q in range(2):
        query = paths.index(rows[3 * q]["query_name"])
        assert query not in [int(row["neighbour"]) for row in rows[3 * q : 3 * q + 3]]  # never its own neighbour
        assert all(row["query_label"] == row["neighbour_label"] == "" for row in rows)
        assert [_frame(picture, layout, q, c) for c in range(4)] == [NEUTRAL] * 4
    embeddings = str(tmp_path / "flat.npy")
    assert (
        _run("embed", "--checkpoint", checkpoint, "--images", str(tmp_path / "flat"), "--out", embeddings, *RUNTIME)
        == 0
    )
    about = json.loads(open(tmp_path / "flat.json").read())
    assert about["images"] == paths and about["labels"] is None
    encoder, _ = load_encoder(checkpoint)
    # the PNGs hold the images exactly: the embeddings are eval's of the same images
    expected = extract_features(encoder, data.test_images[:12], 16, bf16=False, seed=0, split_key=0)
    assert np.array_equal(np.load(embeddings), expected.numpy())


def test_a_folder_of_images_is_cut_at_the_patch_size_the_encoder_was_trained_at(tmp_path):
    # trained on 16x16 images cut into 8x8 patches: an --images folder is decoded at 16 and cut at 8, as training did
    data = make_synthetic(64, TEST_SIZE, 16, seed=0)
    config = TrainConfig(**{**TINY, "image_size": 16, "patch_size": 8}, max_steps=1, out_dir=str(tmp_path / "run"))
    checkpoint = T.train(config).checkpoint_path
    _write_folder(tmp_path / "flat", data.test_images[:6])
    out, folder = str(tmp_path / "flat.npy"), ["--images", str(tmp_path / "flat")]
    assert _run("embed", "--checkpoint", checkpoint, *folder, "--num-patches", "2", "--out", out, *RUNTIME) == 0
    encoder, _ = load_encoder(checkpoint)
    augment = MultiPatchAugment(augment_config_for(8))
    expected = extract_features(encoder, data.test_images[:6], 2, augment, bf16=False, seed=0, split_key=0)
    assert np.array_equal(np.load(out), expected.numpy())
    # a given --patch-size wins: the preview's patches are 12x12
    out = str(tmp_path / "preview.png")
    argv = ["preview", "--checkpoint", checkpoint, *folder, "--patch-size", "12", "--num-images", "2"]
    assert _run(*argv, "--num-patches", "1", "--out", out, *RUNTIME) == 0
    layout = GridLayout(rows=2, columns=2, cell=12 * scale_for(12), separated=(0,))
    assert _picture(out).shape == (layout.size[1], layout.size[0], 3)


def test_a_folder_of_images_is_stored_as_the_checkpoints_image_tree(tmp_path):
    """An ImageNet-100 run (stored at a shorter side of 448 kept up to 4:3, a canvas of 597, cut at 224): a folder
    is decoded at 448 up to 4:3, each image in the corner of its canvas with its size, as the trainer's store."""
    stored = {"dataset": "imagenet100:/data/in100", "image_size": None, "max_aspect": None, "patch_size": None}
    payload = {"config": stored, "dataset": {"image_size": 597, "patch_size": 224}}
    args = argparse.Namespace(dataset=None, image_size=None, max_aspect=None, patch_size=None)
    assert folder_storage(args, payload) == (448, 4 / 3, 224)
    args.image_size, args.patch_size = 12, 8
    assert folder_storage(args, payload) == (12, 4 / 3, 8)
    (tmp_path / "f").mkdir()
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(tmp_path / "f" / "wide.png")
    images = folder_images(str(tmp_path / "f"), 12, "cpu", max_aspect=4 / 3, patch_size=8)
    assert images.images.shape == (1, 16, 16, 3) and images.sizes.tolist() == [[12, 16]] and images.patch_size == 8
    assert (images.images[0, :12] == 200).all() and (images.images[0, 12:] == 0).all()


def test_embed_writes_a_split_with_its_labels(tmp_path, data, checkpoint):
    out = str(tmp_path / "test.npy")
    argv = ["embed", "--checkpoint", checkpoint, "--test-size", str(TEST_SIZE), "--max-images", "10"]
    assert _run(*argv, "--num-patches", "4", "--out", out, *RUNTIME) == 0
    encoder, _ = load_encoder(checkpoint)
    expected = extract_features(encoder, data.test_images, 4, bf16=False, seed=0, split_key=SPLIT_KEYS["test"])[:10]
    assert np.array_equal(np.load(out), expected.numpy())
    about = json.loads(open(tmp_path / "test.json").read())
    assert about["labels"] == data.test_labels[:10].tolist() and about["images"][3] == "synthetic:test/3"
    assert about["classes"] == data.classes and about["num_patches"] == 4
    try:
        from safetensors.torch import load_file, safe_open
    except ImportError as err:
        pytest.skip(f"optional dependency not installed: safetensors ({err})")
    out = str(tmp_path / "test.safetensors")
    assert _run(*argv, "--num-patches", "4", "--out", out, *RUNTIME) == 0
    tensors = load_file(out)
    assert torch.equal(tensors["embeddings"], expected) and tensors["labels"].tolist() == about["labels"]
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["empssl"])["images"] == about["images"]


def _colour_present(picture, colour):
    return bool((np.abs(picture.astype(int) - np.asarray(colour) * 255).max(axis=2) <= 2).any())


@pytest.mark.slow  # scikit-learn's import and two t-SNE fits: about 4.5 s on 2 cores
def test_map_draws_each_class_in_its_colour(tmp_path, data, checkpoint):
    pytest.importorskip("matplotlib", reason="optional dependency not installed: matplotlib")
    try:
        import sklearn  # noqa: F401
    except ImportError as err:
        pytest.skip(f"optional dependency not installed: scikit-learn ({err})")
    from matplotlib import colormaps

    classes = ["cat", "dog", "eel"]
    labels = [i % 3 for i in range(15)]
    paths = _write_folder(tmp_path / "tree", data.test_images[:15], [classes[i] for i in labels])
    out = str(tmp_path / "map.png")
    argv = ["map", "--checkpoint", checkpoint, "--images", str(tmp_path / "tree"), "--method", "tsne"]
    assert _run(*argv, "--num-patches", "2", "--out", out, *RUNTIME) == 0
    picture = _picture(out)
    assert picture.shape == (800, 800, 3) and picture.std() > 5  # the figure, not a blank page
    rows = _rows(str(tmp_path / "map.csv"))
    assert sorted(row["name"] for row in rows) == sorted(paths)
    assert {row["name"]: row["label"] for row in rows} == {p: classes[label] for p, label in zip(paths, labels)}
    xy = np.array([[float(row["x"]), float(row["y"])] for row in rows])
    assert np.isfinite(xy).all() and xy.std(axis=0).min() > 0  # spread in two dimensions
    tab10 = colormaps["tab10"].colors
    assert all(_colour_present(picture, tab10[i]) for i in range(3))  # each class in its colour
    assert not _colour_present(picture, tab10[3])  # no fourth class
    # without labels (a flat folder): one colour
    _write_folder(tmp_path / "flat", data.test_images[:15])
    argv = ["map", "--checkpoint", checkpoint, "--images", str(tmp_path / "flat"), "--method", "tsne"]
    assert _run(*argv, "--num-patches", "2", "--out", out, *RUNTIME) == 0
    picture = _picture(out)
    assert _colour_present(picture, tab10[0]) and not _colour_present(picture, tab10[1])
    assert all(row["label"] == "" for row in _rows(str(tmp_path / "map.csv")))


def test_map_without_its_package_is_one_line(tmp_path, capsys, monkeypatch, checkpoint):
    from empssl.viz import maps

    monkeypatch.setattr(maps, "_installed", lambda module: False)
    out = tmp_path / "map.png"
    assert _run("map", "--checkpoint", checkpoint, "--method", "auto", "--out", str(out), *RUNTIME) == 1
    err = capsys.readouterr().err
    assert err == "empssl map: error: empssl map --method tsne needs scikit-learn, which is not installed: " + (
        "pip install scikit-learn\n"
    )
    assert not out.exists()


def test_an_output_never_replaces_an_input(tmp_path, capsys, checkpoint):
    as_png, as_json = str(tmp_path / "model.png"), str(tmp_path / "model.json")
    shutil.copy(checkpoint, as_png)
    shutil.copy(checkpoint, as_json)
    before = open(checkpoint, "rb").read()
    cases = [
        (["embed", "--checkpoint", checkpoint, "--out", checkpoint], "must end with .npy or .safetensors"),
        (["neighbours", "--checkpoint", as_png, "--out", as_png], f"--out would write {as_png} over {as_png}"),
        (["embed", "--checkpoint", as_json, "--out", str(tmp_path / "model.npy")], f"write {as_json} over {as_json}"),
        (["preview", "--checkpoint", as_png, "--out", as_png], "an input of this command"),
        (["map", "--checkpoint", checkpoint, "--out", str(tmp_path)], "must end with .png"),
    ]
    for argv, message in cases:
        assert _run(*argv, *RUNTIME) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"empssl {argv[0]}: error:" in err and message in err, err
    assert all(open(path, "rb").read() == before for path in (checkpoint, as_png, as_json))
    assert not (tmp_path / "model.npy").exists()
