"""Online monitoring (empssl.training.monitor): the effective rank and the collapsed coding rate against float64
references, a monitored run that logs the values at its monitored steps (the kNN equal to eval's on the same subset,
the coding rate of the step's own embeddings) and trains exactly as an unmonitored one, the collapse warning, no host
wait between monitored steps, and data sets without labels."""

import json
import math
import os
import types
import warnings

import numpy as np
import pytest
import torch
from step_counters import count_host_syncs
from tiny_run import TINY

from empssl import checkpoint as ckpt
from empssl.augment.config import augment_config_for
from empssl.augment.multipatch import MultiPatchAugment
from empssl.config import TrainConfig
from empssl.data.dataset import ImageDataset
from empssl.data.synthetic import make_synthetic
from empssl.evaluation.features import SPLIT_KEYS, extract_features
from empssl.evaluation.probe import LabelledFeatures, knn_classify
from empssl.loss import coding_rate
from empssl.models.encoder import load_encoder
from empssl.training import loop as T
from empssl.training.monitor import CollapseWarning, OnlineMonitor, collapsed_coding_rate, effective_rank
from empssl.training.run_folder import CHECKPOINT_NAME, METRICS_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MONITOR_KEYS = {"knn_top1", "effective_rank", "coding_rate", "collapsed_coding_rate", "monitor_s"}


def _records(folder):
    with open(os.path.join(folder, METRICS_NAME)) as f:
        return [json.loads(line) for line in f]


def test_effective_rank_is_rankme_of_the_singular_values():
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(40, 12, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    s = np.linalg.svd(z.numpy(), compute_uv=False)
    p = s / s.sum()
    assert effective_rank(z.float()).item() == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
    # k orthogonal directions of equal weight: rank k; all rows on one line: rank 1
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))
    assert effective_rank(q[:5].repeat(3, 1).float()).item() == pytest.approx(5.0, rel=1e-5)
    assert effective_rank(q[:1].repeat(30, 1).float()).item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("dim, eps", [(16, 0.2), (1024, 0.2), (97, 0.5)])
def test_collapsed_coding_rate_is_the_rate_of_a_group_of_equal_unit_rows(dim, eps):
    u = torch.nn.functional.normalize(torch.randn(dim, dtype=torch.float64), dim=0)
    collapsed = coding_rate(u.expand(25, dim).contiguous(), eps=eps, backend="reference").item()
    assert collapsed_coding_rate(dim, eps) == pytest.approx(collapsed, rel=1e-9)
    diverse = torch.nn.functional.normalize(torch.randn(25, dim, dtype=torch.float64), dim=1)
    assert coding_rate(diverse, eps=eps, backend="reference").item() > 1.5 * collapsed  # what the warning separates


@pytest.fixture(scope="module")
def data():
    return make_synthetic(64, 48, 8, seed=0)


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory, data):
    folder = str(tmp_path_factory.mktemp("monitored") / "run")
    config = TrainConfig(**TINY, max_steps=4, monitor_every=2, monitor_size=40, monitor_patches=3, out_dir=folder)
    threads = torch.get_num_threads()  # a module fixture runs before the tests' one-thread fixture: set it here
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            T.train(config, data)
    finally:
        torch.set_num_threads(threads)
    return config, [w for w in caught if issubclass(w.category, CollapseWarning)]


def test_a_monitored_run_logs_at_its_monitored_steps_and_trains_as_an_unmonitored_one(monitored_run, data, tmp_path):
    config, _ = monitored_run
    records = _records(config.out_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:  # the values at steps 2 and 4 only, in the line of the step
        assert (MONITOR_KEYS <= set(record)) == (record["step"] % 2 == 0), record
        if record["step"] % 2 == 0:
            assert 1.0 <= record["effective_rank"] <= config.z_dim and 0.0 <= record["knn_top1"] <= 1.0
            # the coding rate of the step's own embeddings: the step's loss reports -mean R of the same z
            assert record["coding_rate"] == pytest.approx(-record["tcr"], rel=1e-6)
            assert record["collapsed_coding_rate"] == pytest.approx(0.5 * math.log1p(config.z_dim / config.eps))
    # the kNN of step 4 is eval's kNN of the step-4 encoder on the same fixed subsets
    encoder, _ = load_encoder(os.path.join(config.out_dir, CHECKPOINT_NAME))
    generator = torch.Generator().manual_seed(config.data_seed)
    bank = torch.randperm(64, generator=generator)[:40].sort().values
    queries = torch.randperm(48, generator=generator)[:40].sort().values
    features = [
        extract_features(encoder, images, 3, bf16=False, seed=config.seed, split_key=key)
        for images, key in ((data.train_images[bank], SPLIT_KEYS["train"]), (data.test_images[queries], 1))
    ]
    knn = knn_classify(
        LabelledFeatures(features[0], data.train_labels[bank], features[1], data.test_labels[queries], 10)
    )
    assert records[-1]["knn_top1"] == knn["top1"]
    # monitoring costs the run's trajectory nothing: the same weights bit for bit without it
    plain = TrainConfig(**{**TINY, "max_steps": 4, "monitor_every": 0, "out_dir": str(tmp_path / "plain")})
    T.train(plain, data)
    assert not MONITOR_KEYS & set().union(*map(set, _records(plain.out_dir)))
    monitored, unmonitored = (ckpt.load_checkpoint(os.path.join(c.out_dir, CHECKPOINT_NAME)) for c in (config, plain))
    for name, tensor in unmonitored["model"].items():
        assert torch.equal(monitored["model"][name], tensor), name


def _dropout_step(data):
    """A monitor, and the state of a step about to run whose encoder has a dropout layer, with its batch."""
    monitor = OnlineMonitor(TrainConfig(**TINY, monitor_every=1, monitor_size=8), data, data.train_images, bf16=False)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(3 * 8 * 8, 16)).train()
    state = types.SimpleNamespace(
        device=torch.device("cpu"), encoder=encoder, image_sizes=None, augment=MultiPatchAugment(augment_config_for(8)),
        num_patches=2, seed=0, step=3, bf16=False,
    )  # fmt: skip
    return monitor, state, data.train_images[:16], torch.arange(16)


def test_the_steps_embeddings_draw_their_dropout_from_a_fork_of_the_generator(data):
    """Computed again in training mode, a backbone's dropout draws random numbers: from a fork of the generator, so
    they are the masks the step itself draws, and the run's random numbers are untouched (a monitored run trains as
    an unmonitored one)."""
    monitor, state, images, ids = _dropout_step(data)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    monitor.step_embeddings(state, images, ids)
    assert torch.equal(torch.get_rng_state(), before)
    with torch.no_grad():  # the step's own forward, from the same generator state
        step_z = state.encoder(state.augment(images, 2, seed=0, step=3, image_ids=ids))
    assert torch.equal(monitor.embeddings, step_z) and monitor.embeddings.std() > 0


def test_the_steps_embeddings_are_timed_by_the_synchronising_clock_at_both_ends(data, monkeypatch):
    # on CUDA the clock waits for the device: the recomputed forward's device time is the monitoring's, not the
    # step window's (patches_per_s)
    monitor, state, images, ids = _dropout_step(data)
    ticks = iter((10.0, 12.5))
    monkeypatch.setattr(monitor, "_clock", lambda device: next(ticks))
    monitor.step_embeddings(state, images, ids)
    assert monitor.seconds == 2.5


def test_the_collapse_warning_fires_where_the_coding_rate_nears_its_collapsed_value(monitored_run):
    config, caught = monitored_run
    records = {r["step"]: r for r in _records(config.out_dir) if "coding_rate" in r}
    near = [step for step, r in records.items() if r["coding_rate"] < 1.5 * r["collapsed_coding_rate"]]
    assert near, "the tiny run at lr 0.3 collapses within 4 steps (its coding rate drops from ~9.5 to ~2.4)"
    assert sorted(int(str(w.message).split(":")[0].split()[1]) for w in caught) == near
    assert all("collapsing" in str(w.message) for w in caught)


def test_no_warning_for_a_run_far_from_collapse(data, tmp_path, recwarn):
    config = TrainConfig(**TINY, max_steps=1, monitor_every=1, monitor_size=8, out_dir=str(tmp_path / "run"))
    T.train(config, data)
    (record,) = _records(config.out_dir)
    assert record["coding_rate"] > 1.5 * record["collapsed_coding_rate"]  # at initialisation R is far above it
    assert not [w for w in recwarn if issubclass(w.category, CollapseWarning)]


@pytest.mark.filterwarnings("ignore::empssl.training.monitor.CollapseWarning")
def test_the_host_waits_only_at_monitored_steps(data, tmp_path, monkeypatch):
    """Between two monitored steps the loop makes no host sync (log lines every 100 steps, one checkpoint at the
    end): of the syncs counted between consecutive steps, all are after the monitored steps 3 and 6."""
    counts, original = [], T._TrainingLoop.step_function

    def counting(loop):
        step = original(loop)

        def run(*batch):
            counts.append(sum(calls.values()))
            return step(*batch)

        return run

    monkeypatch.setattr(T._TrainingLoop, "step_function", counting)
    config = TrainConfig(
        **{**TINY, "log_every": 100}, epochs=2, monitor_every=3, monitor_size=8, out_dir=str(tmp_path / "run")
    )
    with count_host_syncs() as calls:
        T.train(config, data)
    between = [after - before for before, after in zip(counts, counts[1:])]  # after steps 1..7 of 8
    assert len(between) == 7 and between[2] > 0 and between[5] > 0  # after steps 3 and 6: the monitoring's reads
    assert [n for step, n in enumerate(between, 1) if step % 3] == [0, 0, 0, 0, 0], between


@pytest.mark.filterwarnings("ignore::empssl.training.monitor.CollapseWarning")
def test_a_data_set_without_labels_is_monitored_only_when_asked_and_without_the_knn(data, tmp_path, capsys):
    unlabelled = ImageDataset(
        "unlabelled", data.train_images, data.train_labels, data.test_images, data.test_labels, []
    )
    config = TrainConfig(**TINY, max_steps=2, out_dir=str(tmp_path / "default"))
    T.train(config, unlabelled)
    assert not MONITOR_KEYS & set().union(*map(set, _records(config.out_dir)))
    assert "no labels" not in capsys.readouterr().err
    config = TrainConfig(**TINY, max_steps=2, monitor_every=2, out_dir=str(tmp_path / "asked"))
    T.train(config, unlabelled)
    last = _records(config.out_dir)[-1]
    assert "effective_rank" in last and "coding_rate" in last and "knn_top1" not in last
    assert "unlabelled has no labels: the online kNN is off" in capsys.readouterr().err


def test_monitoring_options_are_checked():
    for bad in ({"monitor_every": -1}, {"monitor_size": 0}, {"monitor_patches": 0}, {"wandb": " "}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad).validate()


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore::empssl.training.monitor.CollapseWarning")
def test_monitoring_a_captured_cuda_run_leaves_its_training_as_it_was(data, tmp_path):
    """On CUDA the step is a replayed CUDA graph (bf16 autocast): the monitoring between replays measures the step's
    own embeddings and the run's losses stay those of an unmonitored run, bit for bit: cuDNN is deterministic in both
    runs (the trainer then leaves cudnn.benchmark off: its heuristics pick the same algorithms for both)."""
    torch.backends.cudnn.deterministic = True  # conftest restores it after the test
    cuda = {**TINY, "device": "cuda"}
    monitored = TrainConfig(**cuda, max_steps=4, monitor_every=2, monitor_size=40, out_dir=str(tmp_path / "a"))
    plain = TrainConfig(**cuda, max_steps=4, monitor_every=0, out_dir=str(tmp_path / "b"))
    for config in (monitored, plain):
        T.train(config, data)
    records, unmonitored = _records(monitored.out_dir), _records(plain.out_dir)
    for record in records[1::2]:  # steps 2 and 4
        assert record["coding_rate"] == pytest.approx(-record["tcr"], rel=1e-3)  # bf16: the same kernels
        assert 1.0 <= record["effective_rank"] <= 16 and 0.0 <= record["knn_top1"] <= 1.0
    assert [r["loss"] for r in records] == [r["loss"] for r in unmonitored]


def test_the_curves_draw_the_monitoring_and_the_collapsed_value():
    pytest.importorskip("matplotlib", reason="optional dependency not installed: matplotlib")
    from empssl.training.curves import curves_figure

    records = [{"step": s, "loss": -s, "tcr": -3.0 * s, "inv": -0.9, "lr": 0.3 / s} for s in range(1, 7)]
    for record in records[1::2]:
        record.update(knn_top1=record["step"] / 10, effective_rank=2.0 * record["step"], collapsed_coding_rate=2.5)
    axes = [ax for ax in curves_figure(records).axes if ax.get_visible()]
    titles = [ax.get_title() for ax in axes]
    assert titles == ["loss", "L_tcr = -mean R", "L_inv", "learning rate", titles[4], "effective rank of z"]
    assert titles[4].startswith("online kNN top-1")
    assert list(axes[4].lines[0].get_xdata()) == [2, 4, 6] and list(axes[4].lines[0].get_ydata()) == [0.2, 0.4, 0.6]
    assert list(axes[1].lines[1].get_ydata()) == [-2.5, -2.5]  # the collapsed L_tcr, -1/2 log(1 + d/eps)
    plain = [{k: v for k, v in r.items() if k in ("step", "loss", "tcr", "inv", "lr")} for r in records]
    assert len([ax for ax in curves_figure(plain).axes if ax.get_visible()]) == 4  # unmonitored: as before
