"""The on-disk image store (empssl.data.store, .build, .batches): images kept whole at their own sizes, the header
checked, a killed build resumed, only its own stale files removed, each rank reading only its share, the automatic
choice under a cgroup's limit, and a run from the store bitwise the run in memory."""

import dataclasses
import os
import tempfile

import numpy as np
import pytest
import torch
from image_trees import imagenet_style, write_image

import empssl
from empssl.config import TrainConfig
from empssl.data import build as store_build
from empssl.data import dataset
from empssl.data import folder as image_folder
from empssl.data import load as data_load
from empssl.data.batches import InMemoryBatches, StoreBatches
from empssl.data.dataset import DataError
from empssl.data.store import ImageStore, StoreError, read_header
from empssl.device import host_memory_available


def _aspect_tree(root):
    """Images of four shapes (width x height) in two classes, for train and val."""
    shapes = [(30, 20), (20, 30), (24, 24), (60, 10)]
    rng = np.random.default_rng(0)
    from PIL import Image

    for split in ("train", "val"):
        for index, (width, height) in enumerate(shapes):
            os.makedirs(root / split / f"c{index % 2}", exist_ok=True)
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"c{index % 2}" / f"{index}.png")


def test_each_image_is_kept_whole_up_to_the_aspect_limit_in_the_top_left_of_its_canvas(tmp_path):
    _aspect_tree(tmp_path)
    data = data_load.load_dataset(f"folder:{tmp_path}", image_size=10, max_aspect=2.0, stream="on", show_progress=False)
    store = data.train_images
    assert isinstance(store, ImageStore) and store.canvas == 20 and data.image_size == (20, 20)
    # files by class folder: c0 holds 0.png (30x20) and 2.png (24x24), c1 holds 1.png (20x30) and 3.png (60x10)
    assert data.train_sizes.tolist() == [[10, 15], [10, 10], [15, 10], [10, 20]]  # 60x10 is cut to 2:1
    whole = store.load()
    files = [tmp_path / "train" / "c0" / "0.png", tmp_path / "train" / "c0" / "2.png"]
    files += [tmp_path / "train" / "c1" / "1.png", tmp_path / "train" / "c1" / "3.png"]
    for index, file in enumerate(files):
        decoded = image_folder.decode_image(str(file), 10, 2.0)
        height, width = decoded.shape[:2]
        assert np.array_equal(whole[index, :height, :width].numpy(), decoded)
        assert not whole[index, height:].any() and not whole[index, :, width:].any()  # the rest of the canvas is 0
    ids = np.array([3, 0, 3, 2])
    batch = store.read(ids, np.full((4, 20, 20, 3), 7, np.uint8))  # every byte rewritten, the padding too
    assert np.array_equal(batch, whole.numpy()[ids])


def test_a_store_is_checked_before_it_is_read_and_rebuilt_when_damaged(tmp_path):
    imagenet_style(tmp_path, ("a", "b"))
    data_load.load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    path = next((tmp_path / ".empssl_cache").glob("*.train.empssl-store"))
    content = path.read_bytes()
    header = read_header(str(path))
    assert header["count"] == 4 and header["canvas"] == 8 and header["classes"] == ["a", "b"]
    assert header["slots_at"] % 4096 == 0 and len(content) == header["file_size"]
    path.write_bytes(content[:-1])
    with pytest.raises(StoreError, match=f"the store {path} is truncated or corrupt"):
        ImageStore.open(str(path))
    status = bytearray(content)
    status[header["status_at"]] = 0  # an image never finished
    path.write_bytes(bytes(status))
    with pytest.raises(StoreError, match="corrupt: 1 unfinished images"):
        ImageStore.open(str(path))
    path.write_bytes(b"PK\x03\x04 a zip, not a store" + content[30:])
    with pytest.raises(StoreError, match="is not an empssl store"):
        ImageStore.open(str(path))
    with pytest.warns(UserWarning, match="rebuilding the store of the train split"):
        again = data_load.load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    assert path.read_bytes() == content and again.train_images.shape == (4, 8, 8, 3)


def test_only_this_trees_stale_stores_are_removed(tmp_path):
    imagenet_style(tmp_path / "tree", ("a", "b"))
    cache = tmp_path / "cache"
    spec = f"folder:{tmp_path / 'tree'}"
    data_load.load_dataset(spec, image_size=8, cache_dir=str(cache), show_progress=False)
    old = sorted(cache.iterdir())
    imagenet_style(tmp_path / "other", ("x",))
    data_load.load_dataset(f"folder:{tmp_path / 'other'}", image_size=8, cache_dir=str(cache), show_progress=False)
    others = sorted(set(cache.iterdir()) - set(old))
    (cache / "mine.empssl-store").write_bytes(b"the user's own file with the store's suffix")
    (cache / "notes.txt").write_text("the user's")
    write_image(tmp_path / "tree" / "train" / "a" / "new.png", (1, 2, 3))  # the tree changes: a new fingerprint
    data_load.load_dataset(spec, image_size=8, cache_dir=str(cache), show_progress=False)
    left = set(cache.iterdir())
    assert not left & set(old)  # this tree's earlier stores are gone
    assert set(others) <= left and {cache / "mine.empssl-store", cache / "notes.txt"} <= left
    assert len(left) == 2 + len(others) + 2


def test_a_killed_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    imagenet_style(tmp_path, ("a", "b", "c"), per_class=6)
    real = image_folder.decode_image
    calls = []

    def interrupted(file, *args):
        calls.append(file)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(file, *args)

    monkeypatch.setattr(image_folder, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data_load.load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    (partial,) = (tmp_path / ".empssl_cache").glob("*.train.empssl-store.partial")
    header = read_header(str(partial))
    status = np.frombuffer(partial.read_bytes(), np.uint8, header["count"], header["status_at"])
    done = int((status == 1).sum())
    assert 0 < done < 18

    calls.clear()
    monkeypatch.setattr(image_folder, "decode_image", lambda file, *args: calls.append(file) or real(file, *args))
    resumed = data_load.load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    assert len(calls) == (18 - done) + 18  # the train split's missing images, then the whole val split
    assert not list((tmp_path / ".empssl_cache").glob("*.partial"))
    fresh = data_load.load_dataset(
        f"folder:{tmp_path}", image_size=8, cache_dir=str(tmp_path / "c2"), show_progress=False
    )
    assert torch.equal(resumed.train_images, fresh.train_images) and torch.equal(resumed.test_images, fresh.test_images)


def test_a_bad_image_under_on_bad_image_error_leaves_no_partial_store(tmp_path):
    imagenet_style(tmp_path, ("a", "b"))
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode image .*broken.png"):
        data_load.load_dataset(f"folder:{tmp_path}", image_size=8, on_bad_image="error", show_progress=False)
    assert list((tmp_path / ".empssl_cache").iterdir()) == []


def test_each_rank_reads_only_its_share_in_the_global_order(tmp_path, monkeypatch):
    imagenet_style(tmp_path, ("a", "b", "c"), per_class=8)
    data = data_load.load_dataset(f"folder:{tmp_path}", image_size=8, stream="on", show_progress=False)
    store, whole = data.train_images, data.train_images.load()
    permutation = torch.randperm(len(store), generator=torch.Generator().manual_seed(5))
    read = {0: [], 1: []}
    real_read = ImageStore.read
    batch, local = 8, 4
    for rank in (0, 1):
        monkeypatch.setattr(
            ImageStore, "read", lambda self, ids, out, r=rank: read[r].extend(ids) or real_read(self, ids, out)
        )
        source = StoreBatches(store, torch.device("cpu"), batch, local, rank)
        memory = InMemoryBatches(whole)
        source.set_order(permutation, 1)  # from step 1 on, as after a resume mid-epoch
        for position in range(1, len(store) // batch):
            ids = permutation[position * batch + rank * local :][:local]
            assert torch.equal(source.images(position, ids), memory.images(position, ids))
        source.close()
    assert sorted(read[0] + read[1]) == sorted(permutation[batch:].tolist())  # every image once, by one rank
    assert set(read[0]) == {i for p in range(1, 3) for i in permutation[p * batch : p * batch + local].tolist()}


@pytest.mark.gpu
def test_a_step_reads_the_store_into_the_gpu_as_the_images_in_memory(tmp_path):
    """Pinned buffers, the side thread's copies on a side stream, the step's stream waiting on their events: each
    step's images on the GPU are the images in memory, also while the buffers are reused."""
    _aspect_tree(tmp_path)
    imagenet_style(tmp_path, ("d", "e", "f"), per_class=12)
    data = data_load.load_dataset(f"folder:{tmp_path}", image_size=12, max_aspect=2.0, stream="on")
    store, device = data.train_images, torch.device("cuda")
    whole = store.load().to(device)
    permutation = torch.randperm(len(store), device=device, generator=torch.Generator(device).manual_seed(0))
    source = StoreBatches(store, device, 4, 4, 0)
    source.set_order(permutation, 0)
    for position in range(len(store) // 4):
        ids = permutation[position * 4 : position * 4 + 4]
        images = source.images(position, ids)
        assert images.is_cuda and torch.equal(images, whole[ids])
        torch.cuda._sleep(1_000_000)  # a busy stream: the copy of a later batch must not overtake this check
    source.close()


def _train(root, out, **overrides):
    config = TrainConfig(
        dataset=f"folder:{root}", image_size=12, max_aspect=1.5, patch_size=8, width=0.125, hidden_dim=32, z_dim=16,
        num_patches=2, batch_size=8, epochs=2, schedule_epochs=2, device="cpu", progress=False, log_every=1,
        out_dir=str(out), monitor_every=4, monitor_size=6, monitor_patches=2,
    )  # fmt: skip
    return empssl.train(dataclasses.replace(config, **overrides))


def test_a_run_from_the_store_is_bitwise_the_run_in_memory_resumed_mid_epoch_too(tmp_path, monkeypatch):
    from empssl.training import run_folder

    monkeypatch.setattr(run_folder, "write_training_curves", lambda *args: None)  # drawing them is not under test
    _aspect_tree(tmp_path / "shapes")
    imagenet_style(tmp_path / "shapes", ("d", "e", "f"), per_class=4)  # 16 images of several aspects: 2 steps/epoch
    in_memory = _train(tmp_path / "shapes", tmp_path / "memory", stream="off")
    memory = in_memory.encoder.state_dict()
    _train(tmp_path / "shapes", tmp_path / "store", stream="on", max_steps=3)  # stops in the second epoch
    store = _train(
        tmp_path / "shapes", tmp_path / "store", stream="on", resume=str(tmp_path / "store" / "checkpoint.pt")
    )
    assert store.steps == 4 and store.first_step == 3
    assert all(torch.equal(memory[name], value) for name, value in store.encoder.state_dict().items())
    # the online monitoring (its bank and queries read from the stores) measures the same at the last step
    assert store.last_metrics["knn_top1"] == in_memory.last_metrics["knn_top1"]
    assert store.last_metrics["effective_rank"] == in_memory.last_metrics["effective_rank"]


def test_the_automatic_choice_streams_a_set_beyond_half_the_memory_the_process_may_use(tmp_path, monkeypatch):
    imagenet_style(tmp_path, ("a", "b"), per_class=5)
    nbytes = 10 * 16 * 16 * 3
    monkeypatch.setattr(data_load, "host_memory_available", lambda: (2 * nbytes - 1, "a test's cgroup limit"))
    data = data_load.load_dataset(f"folder:{tmp_path}", image_size=16, show_progress=False, need_test=False)
    assert isinstance(data.train_images, ImageStore)
    assert "streamed from the store" in data.note and "a test's cgroup limit" in data.note
    monkeypatch.setattr(data_load, "host_memory_available", lambda: (2 * nbytes, "a test's cgroup limit"))
    data = data_load.load_dataset(f"folder:{tmp_path}", image_size=16, show_progress=False)
    assert isinstance(data.train_images, torch.Tensor) and isinstance(data.test_images, torch.Tensor)
    assert "in memory" in data.note


def _fake_system(root, mountinfo, cgroup, files):
    for path, text in {"proc/self/mountinfo": mountinfo, "proc/self/cgroup": cgroup, **files}.items():
        os.makedirs(os.path.dirname(root / path), exist_ok=True)
        (root / path).write_text(text)
    return str(root)


def test_the_memory_a_process_may_use_is_bounded_by_its_cgroup_v1_or_v2(tmp_path):
    gib, mib = 2**30, 2**20
    meminfo = {"proc/meminfo": f"MemTotal: 33554432 kB\nMemAvailable: {8 * gib // 1024} kB\n"}
    v2 = _fake_system(
        tmp_path / "v2",
        "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        "0::/user.slice/job\n",
        {
            **meminfo,
            "sys/fs/cgroup/user.slice/job/memory.max": f"{gib}\n",
            "sys/fs/cgroup/user.slice/job/memory.current": f"{300 * mib}\n",
            "sys/fs/cgroup/user.slice/job/memory.stat": f"anon 1\ninactive_file {100 * mib}\n",
            "sys/fs/cgroup/user.slice/memory.max": "max\n",
        },
    )
    available, why = host_memory_available(v2)
    assert available == gib - 200 * mib and "cgroup v2 limit of 1.0 GiB" in why
    v1 = _fake_system(
        tmp_path / "v1",
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n",
        "4:memory:/docker/abc\n0::/\n",
        {
            **meminfo,
            "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": "9223372036854771712\n",  # none of its own
            "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes": f"{512 * mib}\n",
            "sys/fs/cgroup/memory/docker/memory.limit_in_bytes": f"{2 * gib}\n",  # the parent's bounds it
            "sys/fs/cgroup/memory/docker/memory.usage_in_bytes": f"{gib}\n",
            "sys/fs/cgroup/memory/docker/memory.stat": f"total_inactive_file {256 * mib}\n",
        },
    )
    available, why = host_memory_available(v1)
    assert available == 2 * gib - (gib - 256 * mib) and "cgroup v1 limit of 2.0 GiB" in why
    free = _fake_system(tmp_path / "none", "", "0::/\n", meminfo)
    assert host_memory_available(free) == (8 * gib, "the machine's available memory (MemAvailable)")


_PEAK_SCRIPT = """
import dataclasses, json, sys
import torch, empssl
from empssl.config import TrainConfig
torch.set_num_threads(1)
root, out, stream = sys.argv[1:4]
config = TrainConfig(dataset="folder:" + root, image_size=160, patch_size=8, width=0.125, hidden_dim=32, z_dim=16,
                     num_patches=2, batch_size=16, epochs=1, schedule_epochs=1, device="cpu", progress=False,
                     log_every=10, stream=stream, out_dir=out + "/warm", max_steps=2)
empssl.train(config)  # imports, the allocator's pools, the store's reader: the baseline holds them

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak resident set (VmHWM) to the current one
base = status("VmRSS")
result = empssl.train(dataclasses.replace(config, out_dir=out + "/run", max_steps=None))
print(json.dumps({"base": base, "peak": status("VmHWM"), "steps": result.steps}))
"""


@pytest.mark.slow  # two subprocesses that import torch and train an epoch: about 15 s on 2 cores
def test_a_run_trains_from_a_store_twice_the_memory_it_may_use(tmp_path):
    """A run that reads every image of a 64 MB store once (an epoch) grows its resident memory by less than half the
    store: it would train under a limit of half the store. The same run in memory grows by the whole store (so the
    measurement sees what loading costs)."""
    import json
    import subprocess
    import sys

    from PIL import Image

    gradient = np.linspace(0, 255, 160 * 160 * 3).reshape(160, 160, 3).astype(np.uint8)
    for index in range(880):  # 880 x 160 x 160 x 3 bytes: 64.5 MiB of pixels
        os.makedirs(tmp_path / "data" / f"c{index % 2}", exist_ok=True)
        Image.fromarray(np.roll(gradient, index, axis=1)).save(tmp_path / "data" / f"c{index % 2}" / f"{index}.png")
    store = data_load.load_dataset(f"folder:{tmp_path / 'data'}", image_size=160, stream="on", show_progress=False)
    size = store.train_images.nbytes
    peaks = {}
    for stream in ("on", "off"):
        out = tempfile.mkdtemp(dir=tmp_path)
        child = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "data"), out, stream],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert child.returncode == 0, child.stderr[-2000:]
        record = json.loads(child.stdout.strip().splitlines()[-1])
        assert record["steps"] == len(store.train_labels) // 16
        peaks[stream] = record["peak"] - record["base"]
    print(f"store {size / 2**20:.1f} MiB: peak growth streamed {peaks['on'] / 2**20:.1f} MiB, "
          f"in memory {peaks['off'] / 2**20:.1f} MiB")  # fmt: skip
    assert peaks["on"] < size / 2
    assert peaks["off"] > size


def test_decoding_uses_every_core_this_process_may_run_on():
    assert store_build.decode_workers() == len(os.sched_getaffinity(0))


def test_a_file_in_the_partial_stores_place_that_is_not_one_is_left_alone(tmp_path):
    imagenet_style(tmp_path, ("a", "b"))
    data_load.load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    cache = tmp_path / ".empssl_cache"
    train = next(cache.glob("*.train.empssl-store"))
    partial = train.with_name(train.name + ".partial")
    train.unlink()
    partial.write_bytes(b"the user's notes, named like a partial store")
    with pytest.raises(StoreError, match="is not a partial store of empssl's; it is left alone"):
        data_load.load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    assert partial.read_bytes() == b"the user's notes, named like a partial store"
    partial.unlink()
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"another file")
    partial.symlink_to(target)  # a link in the partial store's place: never written through
    with pytest.raises(StoreError, match="cannot write .*partial"):
        data_load.load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    assert target.read_bytes() == b"another file" and partial.is_symlink()


@pytest.mark.parametrize("image_size, max_aspect", [(8, 1.0), (10, 2.0)])  # canvases of 8x8x3 (words) and 20x20x3
def test_a_stores_fingerprint_is_the_fingerprint_of_its_images_in_memory(tmp_path, monkeypatch, image_size, max_aspect):
    """Its per-image sums were taken when it was built: a run resumed in memory from a run on the store (or the
    reverse) is the same data, and checking it reads no more than the sampled images."""
    from empssl.data.dataset import fingerprint

    _aspect_tree(tmp_path)
    imagenet_style(tmp_path, ("d", "e"), per_class=5)
    store = data_load.load_dataset(
        f"folder:{tmp_path}", image_size=image_size, max_aspect=max_aspect, stream="on", show_progress=False
    ).train_images
    assert fingerprint(store) == fingerprint(store.load()) == fingerprint(store[:100].load())
    assert fingerprint(store[:5]) == fingerprint(store.load()[:5]) != fingerprint(store)
    changed = store.load()
    changed[3, 0, 0, 0] ^= 1
    assert fingerprint(changed) != fingerprint(store)

    # with a sample of 3 images, the store's fingerprint reads those 3 (first and last included) and nothing else
    in_memory = store.load()
    monkeypatch.setattr(dataset, "FINGERPRINT_SAMPLE_BYTES", 3 * store.slot_bytes)
    read, real_read = [], ImageStore.read
    monkeypatch.setattr(
        ImageStore, "read", lambda self, ids, out: read.extend(ids.tolist()) or real_read(self, ids, out)
    )
    monkeypatch.setattr(ImageStore, "load", lambda *args, **kwargs: pytest.fail("the fingerprint loaded the store"))
    assert fingerprint(store) == fingerprint(in_memory)
    assert len(read) == 3 and read[0] == 0 and read[-1] == len(store) - 1 and 0 < read[1] < len(store) - 1


def test_a_store_of_other_settings_survives_and_a_cut_store_reads_its_file_after_removal(tmp_path):
    imagenet_style(tmp_path, ("a", "b"))
    spec = f"folder:{tmp_path}"
    small = data_load.load_dataset(spec, image_size=8, stream="on", show_progress=False)
    kept = small.train_images.select([0, 1])  # as the online monitor's bank: read later, while another run builds
    before = set((tmp_path / ".empssl_cache").iterdir())
    data_load.load_dataset(spec, image_size=16, stream="on", show_progress=False)
    both = set((tmp_path / ".empssl_cache").iterdir())
    assert before < both  # another setting's stores are not stale
    data_load.load_dataset(spec, image_size=8, seed=1, stream="on", show_progress=False)
    assert set((tmp_path / ".empssl_cache").iterdir()) == both  # the seed splits no tree here: the same stores
    expected = small.train_images.load().numpy()[:2]
    os.unlink(small.train_images.path)  # removed by hand: the stores already opened still read their images
    assert np.array_equal(kept.read(np.arange(2), np.empty((2, 8, 8, 3), np.uint8)), expected)
    assert np.array_equal(small.train_images[:2].load().numpy(), expected)


def test_the_same_tree_through_a_link_reuses_its_stores(tmp_path, monkeypatch, recwarn):
    imagenet_style(tmp_path / "tree", ("a", "b"))
    (tmp_path / "link").symlink_to(tmp_path / "tree")
    data_load.load_dataset(f"folder:{tmp_path / 'tree'}", image_size=8, show_progress=False)
    decoded = []
    real = image_folder.decode_image
    monkeypatch.setattr(image_folder, "decode_image", lambda file, *args: decoded.append(file) or real(file, *args))
    data_load.load_dataset(f"folder:{tmp_path / 'link'}", image_size=8, show_progress=False)
    assert decoded == [] and not [w for w in recwarn if "rebuilding" in str(w.message)]


@pytest.mark.parametrize("corrupt", ["a list", "an overflowing count"])
def test_a_store_whose_header_is_corrupt_json_is_rebuilt_and_never_stops_the_cleanup(tmp_path, corrupt):
    import json
    import struct

    from empssl.data.store import MAGIC

    imagenet_style(tmp_path, ("a", "b"))
    data_load.load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    path = next((tmp_path / ".empssl_cache").glob("*.train.empssl-store"))
    content, header = path.read_bytes(), read_header(str(path))
    text = json.dumps(header, sort_keys=True)
    text = "[1, 2]" if corrupt == "a list" else text.replace(f'"count": {header["count"]}', '"count": 1e400')
    path.write_bytes(MAGIC + struct.pack("<Q", len(text)) + text.encode() + content[len(MAGIC) + 8 + len(text) :])
    with pytest.raises(StoreError, match="is corrupt"):
        ImageStore.open(str(path))
    copy = tmp_path / ".empssl_cache" / "copy.empssl-store"
    copy.write_bytes(path.read_bytes())
    assert store_build.remove_stale_stores(str(tmp_path / ".empssl_cache"), "", header) == []  # skipped, no error
    with pytest.warns(UserWarning, match="rebuilding the store of the train split"):
        data_load.load_dataset(f"folder:{tmp_path}", image_size=8, show_progress=False)
    assert path.read_bytes() == content


def test_a_resumed_build_counts_the_space_its_partial_store_already_takes(tmp_path, monkeypatch):
    import collections

    imagenet_style(tmp_path, ("a", "b"), per_class=20, val_folder="val")
    real = image_folder.decode_image
    calls = []

    def interrupted(file, *args):
        calls.append(file)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real(file, *args)

    monkeypatch.setattr(image_folder, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data_load.load_dataset(f"folder:{tmp_path}", image_size=32, show_progress=False)
    monkeypatch.setattr(image_folder, "decode_image", real)
    (partial,) = (tmp_path / ".empssl_cache").glob("*.partial")
    held = os.stat(partial).st_blocks * 512
    least = 40 * 32 * 32 * 3
    assert held > 4096  # the decoded images' pages
    usage = collections.namedtuple("usage", "total used free")
    free = lambda folder: usage(1, 0, least - held if partial.exists() else 2**40)  # noqa: E731
    monkeypatch.setattr(store_build.shutil, "disk_usage", free)  # the train split fits only beside its partial
    resumed = data_load.load_dataset(f"folder:{tmp_path}", image_size=32, show_progress=False)
    assert len(resumed.train_labels) == 40
    monkeypatch.setattr(store_build.shutil, "disk_usage", lambda folder: usage(1, 0, least - 1))
    with pytest.raises(DataError, match="needs at least .* GiB, but .* has"):
        data_load.load_dataset(f"folder:{tmp_path}", image_size=32, cache_dir=str(tmp_path / "c2"), show_progress=False)
    assert list((tmp_path / "c2").iterdir()) == []  # nothing left behind by the refusal


def test_on_a_gpu_the_test_split_is_judged_beside_the_training_split_kept_before_it(tmp_path, monkeypatch):
    imagenet_style(tmp_path, ("a", "b"), per_class=5)  # train and val: 10 images of 16x16 each
    nbytes = 10 * 16 * 16 * 3
    monkeypatch.setattr(data_load, "host_memory_available", lambda: (2**40, "a test's machine"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * nbytes, 2**40))  # each split alone fits
    data = data_load.load_dataset(f"folder:{tmp_path}", image_size=16, stream="on", show_progress=False)
    data = data_load._hold(data, "auto", torch.device("cuda", 0), True, False)
    assert isinstance(data.train_images, torch.Tensor) and isinstance(data.test_images, ImageStore)
    assert f"beside the {nbytes / 2**10:.1f} KiB of the split before it" in data.note
