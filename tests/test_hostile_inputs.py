"""Nothing of the user's is touched, nothing hangs, nothing unverified is used (issue 29): one test (or a few) per row
of the issue's table, each with variants of its class. In-process where possible; a subprocess (with a timeout, so a
regression fails instead of hanging) only where the case is a hang."""

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from tiny_run import TINY, TINY_ARGS, checkpoint_readers

from empssl import checkpoint as ckpt
from empssl import cli
from empssl.augment.config import AugmentConfig
from empssl.augment.multipatch import MultiPatchAugment
from empssl.checks import FLOAT32_MAX
from empssl.config import EvalConfig, TrainConfig
from empssl.data import build as store_build
from empssl.data import folder as image_folder
from empssl.data.dataset import DataError, ImageDataset, fingerprint
from empssl.data.npz import load_npz
from empssl.data.store import read_header
from empssl.evaluation import pipeline
from empssl.evaluation.probe import LabelledFeatures, ProbeDivergedError, knn_classify, linear_probe
from empssl.files import TEMP_PREFIX, LinkRefused, StagedWrite, append_text, remove_stale_temporaries, write_atomically
from empssl.loss import EMPSSLLoss, coding_rate
from empssl.models.encoder import build_encoder
from empssl.training import curves, run_lock
from empssl.training import loop as T
from empssl.training import run_folder as run_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(out, *extra):
    return cli.main(["train", *TINY_ARGS, "--out-dir", str(out), *extra])


def _one_clear_line(err):
    lines = [line for line in err.strip().splitlines() if line.startswith("empssl")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def _files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        out = tmp_path_factory.mktemp("pristine") / "run"
        assert _train(out, "--max-steps", "2") == 0
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def saved_run(tmp_path, pristine_run):
    """A copy of one 2-step run: (its folder, its checkpoint)."""
    out = tmp_path / "run"
    shutil.copytree(pristine_run, out)
    return out, out / run_dir.CHECKPOINT_NAME


def _rewrite(path, change, checksums=True):
    """The checkpoint with ``change`` applied to its payload; with ``checksums`` they are recomputed (a forgery),
    else the old ones are kept (a change after writing)."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    if checksums:
        payload.pop("checksums")
        ckpt.save_checkpoint(str(path), {k: v for k, v in payload.items() if k not in ("format", "version")})
    else:
        torch.save(payload, path)


# ---------------------------------------------------------------------- links in a run folder


@pytest.mark.parametrize(
    "name", [run_lock.LOCK_NAME, run_dir.METRICS_NAME, run_dir.CHECKPOINT_NAME, run_dir.CURVES_NAME]
)
def test_a_run_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, capsys, name):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("the user's own file\n")
    (out / name).symlink_to(victim)
    assert _train(out, "--max-steps", "2", "--overwrite") == 1
    line = _one_clear_line(capsys.readouterr().err)
    assert f"{out / name} is a symbolic link (to {victim})" in line
    assert victim.read_text() == "the user's own file\n" and (out / name).is_symlink()
    assert sorted(os.listdir(out)) == [name]  # nothing of the refused run


@pytest.mark.parametrize(
    "name", [run_lock.LOCK_NAME, run_dir.METRICS_NAME, run_dir.CHECKPOINT_NAME, run_dir.CURVES_NAME]
)
def test_a_run_file_that_is_a_hard_link_never_changes_its_other_name(tmp_path, capsys, name):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("the user's own file\n")
    os.link(victim, out / name)
    code = _train(out, "--max-steps", "2", "--overwrite")
    err = capsys.readouterr().err
    if name == run_lock.LOCK_NAME:  # written in place: refused
        assert code == 1 and f"{out / name} is a hard link (2 names of one file)" in _one_clear_line(err)
    else:  # replaced by a new file (os.replace): the other name keeps its content
        assert code == 0, err
    assert victim.read_text() == "the user's own file\n"


def test_owned_files_are_never_opened_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(LinkRefused, match="is a symbolic link"):
        append_text(str(tmp_path / "metrics.jsonl"), "{}\n")  # a link planted after the run's checks
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / ".lock").symlink_to(victim)
    with pytest.raises(LinkRefused):
        run_lock.RunLock(str(tmp_path / "sweep")).acquire()
    assert victim.read_text() == "mine\n"


def test_a_lock_released_after_its_path_was_replaced_removes_nothing(tmp_path):
    lock = run_lock.RunLock(str(tmp_path / "run")).acquire()
    os.remove(lock.path)
    (tmp_path / "run" / ".lock").write_text("someone else's\n")
    lock.release()
    assert (tmp_path / "run" / ".lock").read_text() == "someone else's\n"


# ---------------------------------------------------------------------- shared folders as outputs


def test_the_root_home_and_a_repository_root_are_refused_as_out_dir(tmp_path, capsys, monkeypatch):
    assert _train("/", "--max-steps", "1") == 1
    assert "--out-dir / is the root folder" in _one_clear_line(capsys.readouterr().err)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _train(tmp_path, "--max-steps", "1") == 1
    assert "is your home folder" in _one_clear_line(capsys.readouterr().err)
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    assert _train(repo, "--max-steps", "1") == 1
    assert "is the root of a repository" in _one_clear_line(capsys.readouterr().err)
    assert sorted(os.listdir(repo)) == [".git"]
    assert _train(repo, "--max-steps", "1", "--overwrite") == 0  # said explicitly
    assert (repo / run_dir.CHECKPOINT_NAME).exists()
    assert cli.main(["reproduce", "patches", "--dataset", "synthetic", "--out-dir", str(tmp_path)]) == 1
    assert "is your home folder" in capsys.readouterr().err


# ---------------------------------------------------------------------- the folder cache


def _image_tree(root, classes=("a", "b"), count=5, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in classes:
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / label / f"{index}.png")


def test_the_cache_removes_only_the_caches_it_wrote_of_this_tree(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    mine = {
        "features.npy": b"the user's array",
        "run.meta.json": b'{"classes": ["x"]}',
        "0123456789abcdef0123.train-images.npy": b"named like a cache, no marker",
        "0123456789abcdef0123.meta.json": b'{"classes": ["x"], "source": "/elsewhere"}',
        "0123456789abcdef0123.train.empssl-store": b"named like a store, not one",
        "0123456789abcdef0123.test.empssl-store.partial": b"named like a partial store, not one",
    }
    for name, content in mine.items():
        (cache / name).write_bytes(content)
    _image_tree(tmp_path / "tree")
    _image_tree(tmp_path / "other", seed=1)
    load = lambda tree: image_folder.load_image_folder(  # noqa: E731
        str(tmp_path / tree), image_size=8, cache_dir=str(cache), show_progress=False
    )
    load("tree")
    tree_cache = set(os.listdir(cache)) - set(mine)
    load("other")
    other_cache = set(os.listdir(cache)) - set(mine) - tree_cache
    _image_tree(tmp_path / "tree", classes=("c",))  # the tree changes: its cache is rebuilt, the old one goes
    rebuilt = load("tree")
    assert rebuilt.classes == ["a", "b", "c"]
    for name, content in mine.items():
        assert (cache / name).read_bytes() == content, name
    kept = set(os.listdir(cache)) - set(mine)
    assert other_cache <= kept and not tree_cache & kept  # the tree's old cache went, the other tree's stays
    assert len(tree_cache) == len(other_cache) == len(kept - other_cache) == 2  # a store per split
    # each store names its tree in its header: the proof of whose it is
    assert {read_header(str(cache / name))["source"] for name in other_cache} == {str(tmp_path / "other")}


# ---------------------------------------------------------------------- resume through a link


@pytest.mark.parametrize("kind", ["symbolic", "hard"])
def test_resume_through_a_link_keeps_the_runs_metrics_history(tmp_path, saved_run, kind):
    out, path = saved_run
    link = tmp_path / "elsewhere" / "latest.pt"
    link.parent.mkdir()
    link.symlink_to(path) if kind == "symbolic" else os.link(path, link)
    assert _train(out, "--resume", str(link), "--max-steps", "4") == 0
    records = [json.loads(line) for line in (out / run_dir.METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2, 3, 4] and records[2]["event"] == "resume"
    assert len({r["run_id"] for r in records}) == 1


# ---------------------------------------------------------------------- checkpoints: every field verified


@pytest.mark.parametrize(
    "place, change",
    [
        ("step", lambda p: p.__setitem__("step", 3)),
        # another last character whatever the random run id ends with
        ("run_id", lambda p: p.__setitem__("run_id", p["run_id"][:-1] + ("1" if p["run_id"].endswith("0") else "0"))),
        ("elapsed_s", lambda p: p.__setitem__("elapsed_s", float("nan"))),
        ("model_config/width", lambda p: p["model_config"].__setitem__("width", 0.25)),
        ("config/lr", lambda p: p["config"].__setitem__("lr", 0.4)),
        ("optimizer/param_groups/0/momentum", lambda p: p["optimizer"]["param_groups"][0].__setitem__("momentum", 5.0)),
        ("dataset/num_train", lambda p: p["dataset"].__setitem__("num_train", 65)),
        ("permutation", lambda p: p.__setitem__("permutation", p["permutation"].flip(0))),
    ],
)
def test_a_changed_non_tensor_field_is_refused_naming_it(saved_run, capsys, place, change):
    out, path = saved_run
    _rewrite(path, change, checksums=False)
    with pytest.raises(ckpt.CheckpointError, match=f"corrupt: (field|tensor) {place} does not match its checksum"):
        ckpt.load_checkpoint(str(path))
    capsys.readouterr()
    assert _train(out, "--resume", str(path), "--max-steps", "4") == 1
    assert f"{place} does not match its checksum" in _one_clear_line(capsys.readouterr().err)
    assert cli.main(["eval", "--checkpoint", str(path), "--device", "cpu", "--no-progress"]) == 1
    assert f"{place} does not match its checksum" in _one_clear_line(capsys.readouterr().err)


def test_a_removed_or_added_field_is_refused(saved_run):
    _, path = saved_run
    _rewrite(path, lambda p: p.pop("epoch"), checksums=False)
    with pytest.raises(ckpt.CheckpointError, match="field epoch is missing"):
        ckpt.load_checkpoint(str(path))
    _rewrite(path, lambda p: p.update(epoch=0, extra=1), checksums=False)
    with pytest.raises(ckpt.CheckpointError, match="field extra was added after it was written"):
        ckpt.load_checkpoint(str(path))


def test_checksums_of_a_newer_version_are_refused_as_such_and_version_1_still_verifies(saved_run, capsys):
    _, path = saved_run
    _rewrite(path, lambda p: p["checksums"].__setitem__("version", 3), checksums=False)
    with pytest.raises(ckpt.CheckpointError, match="checksums of version 3, .* a newer empssl wrote it"):
        ckpt.load_checkpoint(str(path))
    version_1 = lambda p: p.__setitem__(  # noqa: E731
        "checksums", {place: ckpt.tensor_checksum(t) for place, t in ckpt._tensors(p) if place != "checksums"}
    )
    _rewrite(path, version_1, checksums=False)
    ckpt.load_checkpoint(str(path))
    assert "only its tensors held checksums" in capsys.readouterr().err
    _rewrite(path, lambda p: p["model"]["backbone.conv1.weight"].mul_(2), checksums=False)
    with pytest.raises(ckpt.CheckpointError, match="tensor model/backbone.conv1.weight does not match its checksum"):
        ckpt.load_checkpoint(str(path))


def _momentum(payload):
    return next(iter(payload["optimizer"]["state"].values()))


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda p: _momentum(p).__setitem__("momentum_buffer", _momentum(p)["momentum_buffer"].reshape(-1)),
         r"optimizer/state/0/momentum_buffer is torch.float32 \(\d+,\), its parameter is"),
        (lambda p: p["rng"].__setitem__("torch_cpu", p["rng"]["torch_cpu"][:-8]), "unusable field rng/torch_cpu"),
        (lambda p: p["rng"].__setitem__("permutation", p["rng"]["permutation"].float()), "field rng/permutation"),
        (lambda p: p["rng"].__setitem__("torch_cpu", torch.zeros_like(p["rng"]["torch_cpu"])),
         "unusable field rng/torch_cpu: not a valid generator state"),
        (lambda p: p["rng"].__setitem__("permutation", torch.zeros_like(p["rng"]["permutation"])),
         "unusable field rng/permutation: not a valid generator state"),
        (lambda p: p["rng"].__setitem__("torch_cuda", torch.zeros(16, dtype=torch.uint8)),
         "was trained on cuda: .* resume it with --device cuda"),
        (lambda p: p["config"].__setitem__("lr", torch.tensor([1.0, 2.0])), "unusable field config/lr: expected a num"),
        (lambda p: p["model_config"].__setitem__("z_dim", torch.tensor([16, 16])), "unusable field model_config/z_dim"),
        (lambda p: p["model_config"].__setitem__("backbone_args", {"a": [torch.ones(1)]}),
         "unusable field model_config/backbone_args"),
        (lambda p: p.__setitem__("permutation", p["permutation"].double()), "unusable field permutation"),
        (lambda p: p.__setitem__("permutation", p["permutation"][:-1]), "unusable field permutation: not an order"),
        (lambda p: p.__setitem__("permutation", None), "unusable field permutation: expected a 1-D int64 tensor"),
        (lambda p: p.__setitem__("permutation", torch.zeros_like(p["permutation"])), "field permutation: not an order"),
        (lambda p: p.__setitem__("step", -1), "unusable field step: expected an integer >= 0"),
        (lambda p: p.__setitem__("step", "7"), "unusable field step"),
        (lambda p: p.__setitem__("step", True), "unusable field step"),
        (lambda p: p.__setitem__("run_id", 7), "unusable field run_id"),
        (lambda p: p.__setitem__("elapsed_s", float("inf")), "unusable field elapsed_s"),
        (lambda p: p["dataset"].__setitem__("num_train", "64"), "unusable field dataset/num_train"),
        (lambda p: p["optimizer"]["param_groups"][0].__setitem__("eta", float("nan")),
         "unusable field optimizer/param_groups/0/eta"),
        (lambda p: p["optimizer"]["param_groups"][0].__setitem__("params", [0]), "param_groups/0/params does not"),
        (lambda p: p["optimizer"]["state"].__setitem__(999, {}), "optimizer/state/999 belongs to no parameter"),
        (lambda p: p["model"].__setitem__("projection.3.weight", p["model"]["projection.3.weight"][:-1]),
         r"model/projection.3.weight is torch.float32 \(15, 32\), the model built from its model_config needs"),
    ],
)  # fmt: skip
def test_a_forged_field_with_recomputed_checksums_is_one_line_naming_it(saved_run, capsys, change, expected):
    out, path = saved_run
    _rewrite(path, change)
    capsys.readouterr()
    assert _train(out, "--resume", str(path), "--max-steps", "4") == 1
    line = _one_clear_line(capsys.readouterr().err)
    assert re.search(expected, line), line


@pytest.mark.parametrize(
    "model_config, expected",
    [
        ({"hidden_dim": 100_000}, "does not fit: model/pre_feature.0.bias is torch.float32 (32,), the model built"),
        ({"hidden_dim": 10**12}, "unusable model_config"),
        ({"hidden_dim": 2**70}, "unusable model_config"),
        ({"width": 3e38}, "unusable model_config"),
        ({"arch": "resnet9000"}, "unusable model_config"),
    ],
)
def test_a_model_config_that_does_not_match_its_tensors_is_refused_before_building(
    saved_run, capsys, model_config, expected
):
    _, path = saved_run
    _rewrite(path, lambda p: p["model_config"].update(model_config))
    capsys.readouterr()
    start = time.perf_counter()
    assert cli.main(["eval", "--checkpoint", str(path), "--device", "cpu", "--no-progress"]) == 1
    assert expected in _one_clear_line(capsys.readouterr().err) and time.perf_counter() - start < 20


# ---------------------------------------------------------------------- hostile pickles


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_pickle_is_refused_as_unsafe_and_never_runs(tmp_path, saved_run, capsys):
    out, path = saved_run
    marker = tmp_path / "ran"
    payload = torch.load(path, weights_only=True)
    payload["config"]["hook"] = _Hostile(marker)
    torch.save(payload, path)
    capsys.readouterr()
    for command in checkpoint_readers(path, out, tmp_path / "b.pt"):
        assert cli.main(command) == 1
        line = _one_clear_line(capsys.readouterr().err)
        assert "is unsafe" in line and "posix.system" in line, line
        assert "weights_only" not in line and "truncated or corrupt" not in line and "will likely succeed" not in line
    (tmp_path / "plain.pt").write_bytes(pickle.dumps(_Hostile(marker)))  # a bare pickle, not torch's zip
    with pytest.raises(ckpt.CheckpointError, match="is unsafe"):
        ckpt.load_checkpoint(str(tmp_path / "plain.pt"))
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.array([_Hostile(marker)] * 4))
    (tmp_path / "p.npz").write_bytes(pickle.dumps({"images": _Hostile(marker)}))  # a pickle named .npz
    for name in ("d.npz", "p.npz"):
        with pytest.raises(DataError, match="is unsafe: it holds Python objects"):
            load_npz(str(tmp_path / name))
    assert not marker.exists()


# ---------------------------------------------------------------------- bounded decoding


def test_an_elongated_image_is_resized_only_where_the_crop_keeps_it(tmp_path, monkeypatch):
    from PIL import Image

    sizes = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda self, size, *a, **k: sizes.append(size) or real_resize(self, size, *a, **k)
    )
    rng = np.random.default_rng(0)
    strip = rng.integers(0, 256, (500000, 1, 3), dtype=np.uint8)  # 1 x 500,000 pixels, a ~2 KB PNG once flat
    Image.fromarray(strip).save(tmp_path / "strip.png")
    decoded = image_folder.decode_image(str(tmp_path / "strip.png"), 32)
    assert decoded.shape == (32, 32, 3) and sizes == [(32, 32)]  # not 32 x 16,000,000
    # the same pixels as a whole resize and centre crop (up to rounding) where that is affordable
    wide = rng.integers(0, 256, (9, 400, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    sizes.clear()
    boxed = image_folder.decode_image(str(tmp_path / "wide.png"), 16).astype(int)
    whole = np.asarray(real_resize(Image.fromarray(wide), (711, 16), Image.BILINEAR))[:, 347:363].astype(int)
    assert sizes == [(16, 16)] and np.abs(boxed - whole).max() <= 1


def test_an_image_of_too_many_pixels_is_refused_from_its_header(tmp_path, monkeypatch):
    _image_tree(tmp_path / "tree")
    decoded = []
    real = image_folder.to_rgb8
    monkeypatch.setattr(image_folder, "to_rgb8", lambda image: decoded.append(image.size) or real(image))
    monkeypatch.setattr(image_folder, "MAX_SOURCE_PIXELS", 99)  # the 10x10 images are over it
    with pytest.raises(ValueError, match="10x10 pixels, more than the 99 an image may have"):
        image_folder.decode_image(str(tmp_path / "tree" / "a" / "0.png"), 8)
    with pytest.warns(UserWarning, match="skipping image .*0.png that does not decode: ValueError: 10x10 pixels"):
        with pytest.raises(DataError, match="no image of the train split"):
            image_folder.load_image_folder(str(tmp_path / "tree"), image_size=8, show_progress=False)
    assert decoded == []


def test_decoding_threads_share_one_memory_budget(tmp_path, monkeypatch):
    _image_tree(tmp_path / "tree", count=8)
    held, peak = [0], [0]
    real = image_folder.to_rgb8

    def slow(image):
        held[0] += 1
        peak[0] = max(peak[0], held[0])
        time.sleep(0.01)
        held[0] -= 1
        return real(image)

    monkeypatch.setattr(image_folder, "to_rgb8", slow)
    monkeypatch.setattr(store_build, "decode_workers", lambda: 4)  # threads that could overlap on any machine
    monkeypatch.setattr(image_folder, "_DECODE_BUDGET", image_folder._MemoryBudget(10 * 10 * 8))  # one image at a time
    data = image_folder.load_image_folder(str(tmp_path / "tree"), image_size=8, show_progress=False)
    assert peak[0] == 1 and data.train_images.shape[0] + data.test_images.shape[0] == 16


# ---------------------------------------------------------------------- FIFOs and devices: never opened


FIFO_SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    from empssl import cli
    from empssl.data.folder import load_image_folder
    root = sys.argv[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_image_folder(os.path.join(root, "tree"), image_size=8, show_progress=False)
    print("images", data.train_images.shape[0] + data.test_images.shape[0])
    print("warned", any("fifo.png" in str(w.message) and "FIFO" in str(w.message) for w in caught))
    for name, command in (
        ("eval", ["eval", "--checkpoint", os.path.join(root, "pipe.pt"), "--device", "cpu", "--no-progress"]),
        ("export", ["export", "--checkpoint", os.path.join(root, "pipe.pt"), "--out", os.path.join(root, "o.pt")]),
        ("npz", ["eval", "--random-init", "--dataset", "npz:" + os.path.join(root, "pipe.pt"), "--device", "cpu"]),
        ("plot", ["plot", os.path.join(root, "pipe.pt")]),
        ("device", ["eval", "--checkpoint", "/dev/zero", "--device", "cpu"]),
    ):
        print(name, cli.main(command), flush=True)
""")


@pytest.mark.slow  # a subprocess (a regression hangs: its timeout fails it): ~6 s
def test_fifos_and_devices_are_refused_without_blocking(tmp_path):
    _image_tree(tmp_path / "tree")
    os.mkfifo(tmp_path / "tree" / "a" / "fifo.png")
    os.mkfifo(tmp_path / "pipe.pt")
    done = subprocess.run(
        [sys.executable, "-c", FIFO_SCRIPT, str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == "images 10 warned True eval 1 export 1 npz 1 plot 1 device 1".split(), done.stdout
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 5 and "Traceback" not in done.stderr, done.stderr
    assert sum("pipe.pt is a FIFO (named pipe), not a regular file" in line for line in errors) == 4
    assert "/dev/zero is a character device, not a regular file" in errors[4]


# ---------------------------------------------------------------------- unreadable class folders


def test_an_unreadable_class_folder_stops_the_load_naming_it(tmp_path, monkeypatch):
    _image_tree(tmp_path / "tree", classes=("a", "b", "c"))
    denied = str(tmp_path / "tree" / "b")
    real = os.scandir

    def scandir(path="."):  # as chmod 000 does for a user who is not root
        if os.fspath(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", denied)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=f"cannot read the class folder {denied} \\(Permission denied\\)"):
        image_folder.load_image_folder(str(tmp_path / "tree"), image_size=8, show_progress=False)
    monkeypatch.setattr(os, "scandir", real)
    assert image_folder.load_image_folder(str(tmp_path / "tree"), image_size=8, show_progress=False).num_classes == 3


def test_a_checkpoint_the_system_refuses_to_read_is_one_line_saying_so_not_corrupt(saved_run, monkeypatch, capsys):
    _, path = saved_run
    real = os.open

    def refusing_open(name, *args, **kwargs):  # as a mode-600 file of another user does for one who is not root
        if os.fspath(name) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    assert cli.main(["eval", "--checkpoint", str(path), "--device", "cpu", "--no-progress"]) == 1
    line = _one_clear_line(capsys.readouterr().err)
    assert f"checkpoint {path} cannot be read: Permission denied" in line and "corrupt" not in line, line


# ---------------------------------------------------------------------- outputs never replace inputs


def test_plot_never_replaces_a_checkpoint_its_log_or_another_non_png(saved_run, tmp_path, capsys):
    out, path = saved_run
    before = _files(out)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for target, message in (
        (path, "exists and is not a PNG"),
        (out / run_dir.METRICS_NAME, "is the metrics log it would be drawn from"),
        (notes, "exists and is not a PNG"),
        (tmp_path, "is a folder"),
    ):
        assert cli.main(["plot", str(out), "--out", str(target)]) == 1
        assert message in _one_clear_line(capsys.readouterr().err)
    assert _files(out) == before and notes.read_text() == "mine"
    assert cli.main(["plot", str(out), "--out", str(out / run_dir.CURVES_NAME)]) == 0  # a PNG is replaced


def test_export_never_replaces_its_checkpoint(saved_run, capsys, tmp_path):
    _, path = saved_run
    before = path.read_bytes()
    link = tmp_path / "same.pt"
    link.symlink_to(path)
    for target in (path, link):
        assert cli.main(["export", "--checkpoint", str(path), "--out", str(target), "--overwrite"]) == 1
        assert "is the checkpoint it exports" in _one_clear_line(capsys.readouterr().err)
    assert path.read_bytes() == before


# ---------------------------------------------------------------------- take-over that fails half-way


@pytest.mark.parametrize("failing", ["metrics", "checkpoint"])
def test_an_overwrite_whose_write_fails_leaves_the_old_run_whole(saved_run, capsys, monkeypatch, failing):
    out, _ = saved_run
    before = _files(out)
    assert run_dir.CURVES_NAME in before  # the old run's curves: they must survive too

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / failing))

    if failing == "metrics":
        monkeypatch.setattr(run_dir.MetricsLog, "stage", no_space)
    else:
        monkeypatch.setattr(ckpt, "stage_checkpoint", no_space)
    capsys.readouterr()
    assert _train(out, "--max-steps", "2", "--seed", "1", "--overwrite") == 1
    assert "No space left on device" in _one_clear_line(capsys.readouterr().err)
    assert _files(out) == before  # no new checkpoint beside the old metrics and curves
    monkeypatch.undo()
    assert _train(out, "--max-steps", "2", "--seed", "1", "--overwrite") == 0
    ids = {json.loads(line)["run_id"] for line in (out / run_dir.METRICS_NAME).read_text().splitlines()}
    assert ids == {ckpt.load_checkpoint(str(out / run_dir.CHECKPOINT_NAME))["run_id"]}


# ---------------------------------------------------------------------- optional outputs


def test_curves_that_cannot_be_written_are_a_warning_and_the_summary_prints(tmp_path, capsys, monkeypatch):
    def disk_full(path, write):
        raise OSError(errno.ENOSPC, f"cannot write {path}: No space left on device", path)

    monkeypatch.setattr(curves, "write_atomically", disk_full)
    pytest.importorskip("matplotlib", reason="optional dependency not installed: matplotlib")
    with pytest.warns(UserWarning, match=r"curves.png was not written \(cannot write .* No space left on device\)"):
        assert _train(tmp_path / "run", "--max-steps", "2") == 0
    captured = capsys.readouterr()
    assert "trained 2 steps in" in captured.out and "error" not in captured.err
    assert {run_dir.CHECKPOINT_NAME, run_dir.METRICS_NAME} <= set(os.listdir(tmp_path / "run"))


# ---------------------------------------------------------------------- temporaries of killed writes


def _killed_write(path):
    """A child process killed by SIGKILL in the middle of write_atomically(path): its temporary stays."""
    child = os.fork()
    if child == 0:  # pragma: no cover (the child never returns)
        try:
            write_atomically(str(path), lambda f: (f.write(b"half"), f.flush(), os.kill(os.getpid(), signal.SIGKILL)))
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_killed_exports_temporary_is_removed_by_the_next_export_and_nothing_else(tmp_path):
    from empssl.models.export import export_checkpoint

    run = T.train(TrainConfig(**{**TINY, "width": 1.0}, max_steps=1, out_dir=str(tmp_path / "run")))
    out = tmp_path / "exports" / "resnet18.pt"
    out.parent.mkdir()
    _killed_write(out)
    left = [name for name in os.listdir(out.parent) if name.startswith(TEMP_PREFIX)]
    assert len(left) == 1 and left[0].startswith(f"{TEMP_PREFIX}resnet18.pt-")
    (out.parent / ".tmp-notes.txt").write_text("the user's")
    (out.parent / f"{TEMP_PREFIX}other.pt-abcdefgh.pt").write_text("another file's")
    live = StagedWrite(str(out), lambda f: f.write(b"a write still going on"))  # holds its lock
    export_checkpoint(run.checkpoint_path, str(out))
    remaining = sorted(os.listdir(out.parent))
    assert (
        left[0] not in remaining and ".tmp-notes.txt" in remaining and f"{TEMP_PREFIX}other.pt-abcdefgh.pt" in remaining
    )
    assert os.path.exists(live.temp)  # a live writer's temporary is never taken
    live.discard()
    assert set(torch.load(out, weights_only=True)) >= {"conv1.weight"}
    remove_stale_temporaries(str(out.parent))  # the run folder's rule: every dead temporary of this package
    assert f"{TEMP_PREFIX}other.pt-abcdefgh.pt" not in os.listdir(out.parent)


def test_a_staged_write_closes_its_file_when_locking_fails_and_never_sets_the_umask(tmp_path, monkeypatch):
    import fcntl

    open_fds = lambda: sorted(os.listdir("/proc/self/fd"))  # noqa: E731
    before, real_flock = open_fds(), fcntl.flock

    def refusing_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refusing_flock)
    with pytest.raises(OSError, match="cannot write .*out.bin: No locks available"):
        StagedWrite(str(tmp_path / "out.bin"), lambda f: f.write(b"x"))
    assert open_fds() == before and os.listdir(tmp_path) == []  # no descriptor, no temporary left
    monkeypatch.setattr(fcntl, "flock", real_flock)

    # reading the umask means setting it: another thread's new file in between would get mode 0666
    saved = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask called"))
        write_atomically(str(tmp_path / "out.bin"), lambda f: f.write(b"x"))
    finally:
        monkeypatch.undo()
        os.umask(saved)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o640  # a plain open()'s mode under umask 027


# ---------------------------------------------------------------------- damaged metrics logs


def test_a_damaged_metrics_line_is_skipped_with_a_warning_naming_the_file(saved_run, capsys):
    out, path = saved_run
    log = out / run_dir.METRICS_NAME
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(
        b'{"step": 1, "loss": \xff}\n' + lines[1] + b'{"step": "7", "loss": 1.0}\n' + b'{"step": 2, "lr": "x"}\n'
    )
    with pytest.warns(UserWarning, match=rf"metrics log {log}: 3 unreadable line\(s\) skipped \(line 1: not UTF-8"):
        assert cli.main(["plot", str(out)]) == 0
    with pytest.warns(UserWarning, match="line 3: its step '7' is not an integer"):
        assert _train(out, "--resume", str(path), "--max-steps", "3") == 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [2, 2, 3]  # the readable history up to the checkpoint, the resume marker, the new step


# ---------------------------------------------------------------------- resume on other data


def test_resume_on_other_images_of_the_same_count_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    labels = np.arange(80) % 4
    np.savez(data, images=rng.integers(0, 256, (80, 8, 8, 3), dtype=np.uint8), labels=labels)
    args = ["--dataset", f"npz:{data}", *TINY_ARGS[2:]]
    out = tmp_path / "run"
    assert cli.main(["train", *args, "--max-steps", "2", "--out-dir", str(out)]) == 0
    original = data.read_bytes()
    np.savez(data, images=rng.integers(0, 256, (80, 8, 8, 3), dtype=np.uint8), labels=labels)
    resume = ["train", *args, "--max-steps", "4", "--out-dir", str(out), "--resume", str(out / "checkpoint.pt")]
    capsys.readouterr()
    assert cli.main(resume) == 1
    line = _one_clear_line(capsys.readouterr().err)
    assert "are not the ones it was trained on (their fingerprint differs)" in line and f"npz:{data}" in line
    data.write_bytes(original)
    assert cli.main(resume) == 0


@pytest.mark.parametrize("size", [8, 7])  # 64-bit words of an image's bytes, or its bytes one by one
def test_the_fingerprint_sees_a_change_to_any_image(monkeypatch, size):
    images = torch.randint(0, 256, (50, size, size, 3), dtype=torch.uint8)
    monkeypatch.setattr("empssl.data.dataset.FINGERPRINT_SAMPLE_BYTES", 2 * size * size * 3)  # 2 images sampled
    base = fingerprint(images)
    assert fingerprint(images.clone()) == base
    for index in (0, 17, 49):
        changed = images.clone()
        changed[index, 3, 4, 1] ^= 1
        assert fingerprint(changed) != base, index
    assert fingerprint(images[:49]) != base


# ---------------------------------------------------------------------- numbers bounded where they enter


@pytest.mark.parametrize("command", ["train", "eval"])
def test_threads_beyond_the_cores_are_refused(capsys, command, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--threads", "100000", "--random-init" if command == "eval" else "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --threads: must be at most this machine's {os.cpu_count()} CPU cores" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "command, option, value, message",
    [
        ("train", "--schedule-epochs", "9223372036854775807", "beyond 2^53"),
        ("train", "--epochs", "9223372036854775808", "must be below 2^63"),
        ("train", "--image-size", "100000", "needs about"),
        ("train", "--train-size", "9200000000000000000", "needs about"),
        ("train", "--width", "3e38", "cannot be built: its tensors are too large"),
        ("eval", "--test-size", "100000000", "needs about"),
        ("eval", "--width", "3e38", "cannot be built: its tensors are too large"),
        ("eval", "--num-patches", "1000000000", "the features' forward of 1000000000 patches per image needs about"),
        ("eval", "--linear-epochs", "1000000000000", "the linear probe and kNN"),
    ],
)
def test_absurd_numbers_are_one_line_before_any_allocation(tmp_path, capsys, command, option, value, message):
    start = time.perf_counter()
    if command == "train":
        argv = ["train", *TINY_ARGS, "--out-dir", str(tmp_path / "run"), option, value]
    else:
        model = ["--width", "0.125", "--hidden-dim", "32", "--z-dim", "16", "--image-size", "8", "--train-size", "32"]
        argv = ["eval", "--random-init", "--dataset", "synthetic", *model, "--test-size", "8", "--device", "cpu"]
        argv += ["--num-patches", "2", "--no-progress", "--threads", "1", option, value]
    try:
        code = cli.main(argv)
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("empssl")]) == 1, err
    assert time.perf_counter() - start < 20 and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- results only from finite state


@pytest.mark.parametrize("options", [{"lr": 3e38}, {"lr": 1e30, "momentum": 0.99}])
def test_a_diverged_probe_is_reported_as_diverged_not_as_an_accuracy(options):
    generator = torch.Generator().manual_seed(torch.seed())
    features = LabelledFeatures(
        torch.randn(64, 8, generator=generator),
        torch.arange(64) % 4,
        torch.randn(32, 8, generator=generator),
        torch.arange(32) % 4,
        4,
    )
    with pytest.raises(
        ProbeDivergedError,
        match=re.escape(f"diverged: its weights became NaN or infinite (at --linear-lr {options['lr']:g}"),
    ):
        linear_probe(features, epochs=3, **options)
    assert 0 <= linear_probe(features, epochs=3)["final_top1"] <= 1  # the recipe's lr does not


@pytest.mark.parametrize(
    "field, value", [("linear_momentum", 5.0), ("linear_momentum", 1.0), ("linear_weight_decay", -1.0), ("knn_k", 0)]
)
def test_probe_settings_that_always_diverge_are_refused(capsys, field, value):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be"):
        EvalConfig(**{field: value}).validate()
    if field != "knn_k":
        with pytest.raises(SystemExit):
            cli.main(["eval", "--random-init", f"--{field.replace('_', '-')}", str(value)])
        assert f"argument --{field.replace('_', '-')}: must be" in capsys.readouterr().err


def test_knn_votes_stay_finite_at_any_temperature():
    generator = torch.Generator().manual_seed(torch.seed())
    train_x, test_x = torch.randn(60, 8, generator=generator), torch.randn(30, 8, generator=generator)
    train_y, test_y = torch.arange(60) % 3, torch.arange(30) % 3
    features = LabelledFeatures(train_x, train_y, test_x, test_y, 3)
    nearest = torch.nn.functional.normalize(test_x, dim=1) @ torch.nn.functional.normalize(train_x, dim=1).T
    one_nn = (train_y[nearest.argmax(1)] == test_y).double().mean().item()
    assert knn_classify(features, temperature=1e-30)["top1"] == pytest.approx(one_nn)  # exp(1e30) was inf


def test_labels_that_make_a_million_classes_are_one_line(tmp_path, capsys, monkeypatch):
    from empssl import device

    path = tmp_path / "d.npz"
    labels = np.arange(40) % 2
    labels[5] = 1_048_575  # the README's bound allows it
    np.savez(path, images=np.zeros((40, 8, 8, 3), np.uint8), labels=labels)
    monkeypatch.setattr(device, "available_memory", lambda where: 16 * 2**30)  # a 16 GiB machine, wherever it runs
    argv = ["eval", "--random-init", "--dataset", f"npz:{path}", "--width", "0.125", "--hidden-dim", "4096"]
    argv += ["--z-dim", "16", "--num-patches", "2", "--device", "cpu", "--no-progress", "--threads", "1"]
    assert cli.main(argv) == 1
    line = _one_clear_line(capsys.readouterr().err)
    assert "the linear probe and kNN over 1048576 classes of 4096-d features" in line
    assert "so 1048576 classes exist for 3 used: number the classes 0 to 2" in line


def test_test_classes_the_training_split_lacks_warn_or_refuse():
    images = torch.zeros(12, 8, 8, 3, dtype=torch.uint8)
    encoder = build_encoder(width=0.125, hidden_dim=16, z_dim=8)
    config = EvalConfig(num_patches=2, linear_epochs=1, progress=False)

    def data(train_labels, test_labels):
        return ImageDataset(
            "folder:x", images, torch.tensor(train_labels), images, torch.tensor(test_labels), ["a", "b", "c", "d"]
        )

    with pytest.raises(
        DataError, match=r"no test image is of a class of the training split \(the test split's classes c, d"
    ):
        pipeline.evaluate(encoder, data([0, 1] * 6, [2, 3] * 6), config)
    with pytest.warns(UserWarning, match=r"6 of the 12 test images are of classes the training split lacks \(c\)"):
        pipeline.evaluate(encoder, data([0, 1] * 6, [0, 2] * 6), config)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"inv_coef": float("nan")}, "inv_coef must be a finite number"),
        ({"tcr_coef": float("inf")}, "tcr_coef must be a finite number"),
        ({"inv_coef": 1e39}, "inv_coef must be a finite number within float32"),
        ({"eps": 10**400}, r"eps must be a finite number within float32's range \(\|x\| <= 3.4e38\), got about 1e400"),
        ({"tcr_coef": -(10**5000)}, "tcr_coef must be a finite number within float32's range"),
        ({"inv_coef": 0.0, "tcr_coef": 0.0}, "both 0"),
        ({"eps": float("inf")}, "eps must be a finite number"),
        ({"eps": 1e-45}, "eps must be a positive number"),
        ({"inv_coef": "200"}, "inv_coef must be a number"),
    ],
)
def test_the_loss_refuses_what_the_command_line_refuses(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        EMPSSLLoss(**options)


def test_an_eps_whose_alpha_overflows_float32_is_refused_before_training(tmp_path, capsys):
    assert _train(tmp_path / "run", "--eps", "1.2e-38", "--z-dim", "1024") == 1
    assert "--eps 1.2e-38 is too small for --z-dim 1024 and --batch-size 16" in _one_clear_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_an_eps_whose_alpha_overflows_float32_is_refused():
    z = torch.nn.functional.normalize(torch.randn(2, 2, 1024), dim=-1)
    assert 1024 / (2 * 1e-37) > FLOAT32_MAX
    with pytest.raises(ValueError, match="alpha = d / \\(b eps\\) overflows float32"):
        coding_rate(z, eps=1e-37)
    assert torch.isfinite(coding_rate(z, eps=1e-30)).all()


@pytest.mark.parametrize(
    "options",
    [{"std": (1e-45, 0.5, 0.5)}, {"std": (0.5, 0.5, 1e-39)}, {"mean": (1e39, 0.5, 0.5)}, {"brightness": float("inf")},
     {"crop_scale": (0.25, 1e300)}, {"std": (0.5, float("nan"), 0.5)}],
)  # fmt: skip
def test_augment_config_refuses_non_finite_or_degenerate_values(options):
    with pytest.raises(ValueError, match="AugmentConfig"):
        AugmentConfig(**options)
    AugmentConfig(std=(1e-30, 1e-30, 1e-30))  # tiny but normal, and (x - mean) / std stays finite


@pytest.mark.parametrize("shape", [(4, 3, 16, 3), (4, 3, 3, 3)])
def test_an_ambiguous_layout_is_refused_naming_both_readings(shape):
    images = torch.zeros(shape, dtype=torch.uint8)
    with pytest.raises(
        ValueError,
        match=rf"ambiguous: as \(B, 3, H, W\) they are 4 images of {shape[2]}x3 pixels, "
        rf"as \(B, H, W, 3\) 4 images of 3x{shape[2]}; say which: pass images.permute",
    ):
        MultiPatchAugment(AugmentConfig.cifar())(images, 2, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- sweeps check everything up front

SWEEP_TRAIN = "--image-size 16 --train-size 32 --batch-size 16 --width 0.125 --hidden-dim 32 --z-dim 16 --threads 1"
SWEEP_EVAL = "--test-size 16 --num-patches 2 --linear-epochs 2 --threads 1"


def _sweep(out, train=SWEEP_TRAIN, evaluation=SWEEP_EVAL):
    return cli.main(
        ["reproduce", "patches", "--dataset", "synthetic", "--device", "cpu", "--out-dir", str(out), "--epochs", "1"]
        + ["--patches", "2", "--train-args", train, "--eval-args", evaluation, "--no-progress"]
    )


@pytest.mark.parametrize(
    "train, evaluation, message",
    [
        (SWEEP_TRAIN, SWEEP_EVAL + " --linear-epohcs 3", "epohcs 3': unrecognized arguments: --linear-epohcs 3"),
        (SWEEP_TRAIN, SWEEP_EVAL + " --linear-momentum 5", "argument --linear-momentum: must be in [0, 1)"),
        (SWEEP_TRAIN + " --lr nan", SWEEP_EVAL, "argument --lr: must be a finite number"),
        (SWEEP_TRAIN + " --tcr-coef 0 --inv-coef 0", SWEEP_EVAL, "leave no loss to minimise"),
        (SWEEP_TRAIN + " --num-patches 5", SWEEP_EVAL, "changes --num-patches, which the sweep sets for each cell"),
        (SWEEP_TRAIN, SWEEP_EVAL + " --checkpoint x.pt", "changes --checkpoint, which the sweep sets"),
    ],
)  # fmt: skip
def test_a_sweeps_options_are_checked_before_any_cell_runs(tmp_path, capsys, train, evaluation, message):
    assert _sweep(tmp_path / "sweep", train, evaluation) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "sweep").exists()  # nothing trained, nothing written


def test_a_corrected_eval_args_continues_the_sweep_without_training_again(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _sweep(out, evaluation=SWEEP_EVAL + " --linear-lr 1e30 --linear-momentum 0.99") == 1  # the probe diverges
    assert "the linear probe diverged" in capsys.readouterr().err
    assert _sweep(out, train=SWEEP_TRAIN + " --seed 1") == 1  # training ran with the old --train-args: refused
    assert "holds another sweep (train_args" in capsys.readouterr().err
    assert _sweep(out) == 0  # the corrected --eval-args: no evaluation had run with the old ones
    assert "continuing the sweep" in capsys.readouterr().err
    events = [json.loads(line) for line in (out / "sweep.log").read_text().splitlines()]
    assert [(e["event"], e["task"]) for e in events] == [
        ("start", "train synthetic-patches-002"),
        ("done", "train synthetic-patches-002"),
        ("start", "eval synthetic-patches-002"),
        ("start", "eval synthetic-patches-002"),
        ("done", "eval synthetic-patches-002"),
    ]
    assert json.loads((out / "sweep.json").read_text())["eval_args"] == SWEEP_EVAL.split()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert json.loads((out / "synthetic-patches-002" / "eval.json").read_text())["linear_top1"] >= 0
