"""Settings as dataclasses whose fields carry their command-line form: a default lives in one place.

``option(default, help, ...)`` is a ``dataclasses.field`` with the option's help text, group and
form in its metadata; ``empssl.options`` turns the fields of a config class into ``argparse`` options
(``batch_size`` -> ``--batch-size``) and configuration-file keys, and builds the config back from them.
``TrainConfig`` and ``EvalConfig`` (both here) are declared this way, so
``empssl train --help`` and ``empssl eval --help`` print the dataclasses' defaults.

Forms: ``value`` (``--name VALUE``), ``switch`` (``--name`` sets True), ``negated`` (a True
default turned off by ``--no-name``), ``on_off`` (``--name on|off``), ``tristate`` (None by
default, ``--name`` / ``--no-name``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Union

from . import checkpoint as ckpt
from .checks import (
    FLOAT32_MAX,
    aspect_ratio,
    finite_float,
    momentum_float,
    non_negative_float,
    positive_float,
    positive_int,
)
from .data.load import BAD_IMAGE_POLICIES, DATASET_SPECS, STREAM_CHOICES
from .models.backbones import (
    ARCH_HELP,
    STEMS,
    arch_type,
    backbone_args_text,
    backbone_args_type,
    check_arch,
    check_options,
    parse_backbone_args,
)
from .ops import augment as augment_op
from .ops import tcr as tcr_op
from .optim import RECIPE_LR

FORMS = ("value", "switch", "negated", "on_off", "tristate")
# how a training step runs on CUDA (TrainConfig.step_variant); bench epoch times each side by side
STEP_VARIANTS = ("eager", "captured", "compiled", "compiled-captured")
EVAL_VIEWS = ("patches", "whole", "both")  # what `eval --views` evaluates (docs/training.md section 5)


def check_numbers(config) -> None:
    """ValueError naming the option of any float field of ``config`` that is NaN, inf or beyond float32's range,
    and of any int field beyond what a tensor index holds (the command line's types refuse them too)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, float) and (not math.isfinite(value) or abs(value) > FLOAT32_MAX):
            raise ValueError(f"{flag} must be a finite number within float32's range (|x| <= 3.4e38), got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise ValueError(f"{flag} {value} is too large (beyond a 64-bit integer)")


def option(
    default: Any,
    help: str,
    *,
    group: str,
    form: str = "value",
    type: Optional[Callable[[str], Any]] = None,
    choices: Optional[Sequence[Any]] = None,
    metavar: Optional[str] = None,
    show_default: bool = True,
    text: Optional[Callable[[Any], str]] = None,
    none_means: Optional[Callable[[Any], Any]] = None,
):
    """A dataclass field with its command-line option. A ``value`` or ``on_off`` option's ``help``
    is completed with the default (unless ``show_default`` is False: the text then says it); a
    ``tristate`` help is "what --name does | what --no-name does". ``text``: the option's text of a value Python
    may give in another form (a dict), for configuration files; ``none_means``: the value that None stands for, of
    the config (a field the command line cannot set to None, written so into configuration files)."""
    if form not in FORMS:
        raise ValueError(f"unknown option form {form!r}; choose one of {FORMS}")
    metadata = {
        "help": help,
        "group": group,
        "form": form,
        "type": type,
        "choices": choices,
        "metavar": metavar,
        "show_default": show_default,
        "text": text,
        "none_means": none_means,
    }
    return dataclasses.field(default=default, metadata={"cli": metadata})


@dataclasses.dataclass
class RuntimeConfig:
    """Where and how a command runs: shared by ``TrainConfig`` and ``EvalConfig``."""

    device: str = option("auto", "cpu, cuda, cuda:N or auto (CUDA when available)", group="runtime")
    seed: int = option(
        0, "seed of everything random: initialisation, batch order, patches, the probe", group="runtime", type=int
    )
    augment_backend: str = option(
        "auto",
        "augmentation backend (auto: the fastest available)",
        group="runtime",
        choices=augment_op.BACKEND_CHOICES,
    )
    bf16: bool = option(True, "bf16 autocast on CUDA (ignored on CPU)", group="runtime", form="on_off")
    progress: bool = option(True, "no progress bars", group="runtime", form="negated")


@dataclasses.dataclass
class EvalConfig(RuntimeConfig):
    """The bag-of-features evaluation (docs/method.md section 6): T patches per image, a linear probe and a weighted
    kNN."""

    num_patches: int = option(128, "patches per image in the bag, T", group="evaluation", type=positive_int)
    test_size: Optional[int] = option(
        None,
        "synthetic: number of test images (default 2000); CIFAR, npz: use only the first N; "
        "image trees: N drawn at random by --data-seed (only they are decoded)",
        group="data",
        type=positive_int,
        show_default=False,
    )
    linear_epochs: int = option(100, "linear probe epochs", group="evaluation", type=positive_int)
    linear_lr: float = option(
        0.03, "linear probe learning rate (cosine over the epochs)", group="evaluation", type=positive_float
    )
    linear_batch_size: int = option(100, "linear probe mini-batch size", group="evaluation", type=positive_int)
    linear_momentum: float = option(
        0.9, "linear probe SGD momentum, in [0, 1)", group="evaluation", type=momentum_float
    )
    linear_weight_decay: float = option(5e-5, "linear probe weight decay", group="evaluation", type=non_negative_float)
    fused_conv: bool = option(
        False,
        "the BatchNorm-folded encoder's convolutions with their bias, ReLU and residual add in one cuDNN kernel "
        "each, on CUDA (chosen by the GPU run's timing: docs/benchmarks.md section 5)",
        group="evaluation",
        form="on_off",
    )
    knn_k: int = option(20, "neighbours of the kNN", group="evaluation", type=positive_int)
    knn_temperature: float = option(0.07, "kNN vote temperature", group="evaluation", type=positive_float)
    views: str = option(
        "patches",
        "an image's features: the mean over its bag of T patches (the method), the whole image resized to the "
        "recipe's patch size, or both, each evaluated",
        group="evaluation",
        choices=EVAL_VIEWS,
    )

    def validate(self) -> None:
        """ValueError naming the option of any value the command line's types refuse."""
        check_numbers(self)
        for name in ("num_patches", "linear_epochs", "linear_batch_size", "knn_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not 0 <= self.linear_momentum < 1:
            raise ValueError(
                f"--linear-momentum must be in [0, 1) (SGD diverges from 1 on), got {self.linear_momentum}"
            )
        if not self.linear_weight_decay >= 0:
            raise ValueError(f"--linear-weight-decay must be >= 0, got {self.linear_weight_decay}")
        for name in ("linear_lr", "knn_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(self, name)}")


@dataclasses.dataclass
class TrainConfig(RuntimeConfig):
    """Everything a training run depends on. Defaults: the 1-epoch CIFAR-10 recipe (20 patches, batch 100).

    Each field is also an option of ``empssl train`` (``batch_size`` -> ``--batch-size``) with the help text here.
    """

    # data (also options of `empssl eval`, whose defaults are the checkpoint's)
    dataset: str = option("cifar10", f"data set: {DATASET_SPECS}", group="data", metavar="SPEC")
    root: str = option("data", "folder holding cifar-10-batches-py/ or cifar-100-python/", group="data")
    download: bool = option(
        False, "download CIFAR with torchvision (MD5-checked) if missing", group="data", form="switch"
    )
    image_size: Optional[int] = option(
        None,
        "image trees: the stored size (each image's shorter side); synthetic: the images' size (default: 64 Tiny "
        "ImageNet, 448 ImageNet-100, else 32)",
        group="data",
        type=positive_int,
        show_default=False,
    )
    max_aspect: Optional[float] = option(
        None,
        "image trees: the longest aspect ratio (long:short, e.g. 4:3) an image keeps whole; beyond it the longer "
        "side is centre-cropped, 1 keeps the centre square (default: 4:3 for ImageNet-100, else 1)",
        group="data",
        type=aspect_ratio,
        metavar="RATIO",
        show_default=False,
    )
    patch_size: Optional[int] = option(
        None,
        "size of the patches the encoder sees, cropped from the stored image and resized (default: the recipe's: "
        "32 CIFAR, 64 Tiny ImageNet, 224 ImageNet-100, else the image size up to 224)",
        group="data",
        type=positive_int,
        show_default=False,
    )
    stream: str = option(
        "auto",
        "image trees: on reads each step's images from the on-disk store (each rank its share, read ahead), off "
        "holds the training split in memory, auto holds it in memory where it fits (`empssl info`: the rule)",
        group="data",
        choices=STREAM_CHOICES,
    )
    train_size: Optional[int] = option(
        None,
        "synthetic: number of train images (default 10000); CIFAR, npz: use only the first N; "
        "image trees: N drawn at random by --data-seed (only they are decoded)",
        group="data",
        type=positive_int,
        show_default=False,
    )
    cache_dir: Optional[str] = option(
        None,
        "where image trees keep their decoded stores (default: PATH/.empssl_cache)",
        group="data",
        show_default=False,
    )
    on_bad_image: str = option(
        "skip",
        "an image of an image tree that does not decode: skip it with a warning, or stop",
        group="data",
        choices=BAD_IMAGE_POLICIES,
    )
    data_seed: int = option(0, "seed of the synthetic data set and of train/test splits", group="data", type=int)
    # encoder (also options of `empssl eval`)
    arch: str = option("resnet18-cifar", ARCH_HELP, group="encoder", type=arch_type, metavar="ARCH")
    width: float = option(
        1.0,
        "channel multiplier of the built-in ResNet-18 (1: 512 features); other backbones have their own widths",
        group="encoder",
        type=positive_float,
    )
    stem: str = option(
        "default",
        "cifar: a torchvision: or timm: ResNet's 7x7 stride-2 conv1 and max-pool become a 3x3 stride-1 conv and no "
        "pooling, for small images (the built-in ResNet-18 names its stem in --arch)",
        group="encoder",
        choices=STEMS,
    )
    backbone_args: Union[str, Dict[str, Any]] = option(
        "",
        "keyword arguments of a torchvision: or timm: model's constructor, KEY=VALUE[,KEY=VALUE...] with Python "
        "literals as values, e.g. img_size=32,patch_size=8 for timm:vit_tiny_patch16_224 on 32x32 images (default: "
        "none)",
        group="encoder",
        type=backbone_args_type,
        text=backbone_args_text,
        metavar="KEY=VALUE,...",
        show_default=False,
    )
    hidden_dim: int = option(
        4096, "size of the pre_feature layer used for evaluation", group="encoder", type=positive_int
    )
    z_dim: int = option(1024, "embedding size", group="encoder", type=positive_int)
    # training
    num_patches: int = option(20, "patches per image per step, n", group="training", type=positive_int)
    batch_size: int = option(
        100,
        "images per step, b; under torchrun the global batch over all ranks (each takes "
        "b / W: it must divide by their number W)",
        group="training",
        type=positive_int,
    )
    lr: float = option(RECIPE_LR, "peak learning rate of LARS-SGD", group="training", type=positive_float)
    epochs: int = option(1, "epochs to train", group="training", type=positive_int)
    schedule_epochs: Optional[int] = option(
        2,
        "length of the cosine schedule in epochs; the 1-epoch recipe uses 2",
        group="training",
        type=positive_int,
        none_means=lambda config: config.epochs,  # None (Python only): the schedule spans the run
    )
    max_steps: Optional[int] = option(
        None,
        "stop after this many steps in total (tests, quick runs)",
        group="training",
        type=positive_int,
        show_default=False,
    )
    eps: float = option(0.2, "coding-rate distortion eps", group="training", type=positive_float)
    inv_coef: float = option(200.0, "weight of the invariance term", group="training", type=finite_float)
    tcr_coef: float = option(1.0, "weight of the coding-rate term", group="training", type=finite_float)
    loss_backend: str = option("auto", "coding-rate backend", group="training", choices=tcr_op.BACKEND_CHOICES)
    channels_last: Optional[bool] = option(
        None,
        "channels_last memory format for patches and encoder (default: on CUDA only) | keep the default memory "
        "format on CUDA too",
        group="training",
        form="tristate",
    )
    step_variant: str = option(
        "captured",
        "how the step runs on CUDA: eager (op by op), captured (recorded once as a CUDA graph and replayed), "
        "compiled (torch.compile of the encoder's forward and the loss as one graph: Inductor fuses BatchNorm, "
        "ReLU and the residual add), compiled-captured (both); off CUDA captured runs eagerly "
        "(docs/training.md section 6)",
        group="training",
        choices=STEP_VARIANTS,
    )
    sync_bn: bool = option(
        False,
        "under torchrun: BatchNorm statistics over every rank's images, so N ranks train as "
        "one process (default: per rank, as the published DataParallel code)",
        group="training",
        form="switch",
    )
    tf32: bool = option(
        False,
        "TF32 for float32 matmuls and cuDNN convolutions on CUDA (default: IEEE float32, "
        "chosen rather than torch's defaults: the loss's float32 Gram needs it; bf16 autocast is unaffected)",
        group="training",
        form="switch",
    )
    # output
    out_dir: str = option(
        "runs/empssl",
        "folder for checkpoint.pt and metrics.jsonl; refused if it holds another run's files",
        group="output",
    )
    overwrite: bool = option(
        False,
        "replace another run's files in --out-dir (once this run has written its first checkpoint)",
        group="output",
        form="switch",
    )
    checkpoint_every: int = option(0, "steps between checkpoints (0: at the end only)", group="output", type=int)
    resume: Optional[str] = option(
        None,
        "continue exactly from this checkpoint; its run's metrics.jsonl is cut back to the checkpoint's step",
        group="output",
        metavar="CHECKPOINT",
        show_default=False,
    )
    log_every: int = option(10, "steps between log lines", group="output", type=positive_int)
    # what the run reports beside its loss (docs/training.md section 9)
    monitor_every: Optional[int] = option(
        None,
        "steps between online checks: kNN top-1 on a fixed held-out subset, the effective rank and coding rate of "
        "the step's embeddings, a collapse warning (0: off; default: every 100 steps where the data set has "
        "labels, the rank and coding rate only when asked for where it has none)",
        group="output",
        type=int,
        metavar="N",
        show_default=False,
    )
    monitor_size: int = option(
        1000,
        "images of each split in the online kNN: its bank (train images) and its queries (test images)",
        group="output",
        type=positive_int,
    )
    monitor_patches: int = option(
        4, "patches per image of the online kNN's features", group="output", type=positive_int
    )
    tensorboard: bool = option(
        False,
        "write the metrics as TensorBoard scalars to OUT_DIR/tensorboard (needs tensorboard)",
        group="output",
        form="switch",
    )
    wandb: Optional[str] = option(
        None,
        "log the metrics to this Weights & Biases project (needs wandb; WANDB_MODE=offline runs without network)",
        group="output",
        metavar="PROJECT",
        show_default=False,
    )

    @property
    def compiled(self) -> bool:
        """The step's forward and loss run as one torch.compile graph."""
        return self.step_variant in ("compiled", "compiled-captured")

    @property
    def captured(self) -> bool:
        """On CUDA the step is recorded once as a CUDA graph and replayed."""
        return self.step_variant in ("captured", "compiled-captured")

    def model_config(self) -> Dict[str, Any]:
        """The encoder's fields (``checkpoint.MODEL_FIELDS``), ``backbone_args`` as a dict: what checkpoints hold."""
        config = {field: getattr(self, field) for field in ckpt.MODEL_FIELDS}
        config["backbone_args"] = parse_backbone_args(self.backbone_args)
        return config

    def warn_short_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        """A warning when the cosine schedule ends before the run: its learning rate is 0 for the steps after it."""
        schedule = steps_per_epoch * (self.schedule_epochs or self.epochs)
        if schedule < total_steps:
            warnings.warn(
                f"--schedule-epochs {self.schedule_epochs} ends the cosine schedule at step {schedule}, "
                f"before this run's {total_steps} steps (--epochs {self.epochs}): the learning rate is 0 "
                f"for the last {total_steps - schedule} of them; pass --schedule-epochs {self.epochs} to "
                f"spread the schedule over the run"
            )

    def validate(self) -> None:
        check_numbers(self)
        check_arch(self.arch)
        check_options(self.arch, self.width, self.stem, self.backbone_args)
        for name in ("num_patches", "batch_size", "epochs", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("schedule_epochs", "max_steps", "patch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.monitor_every is not None and (isinstance(self.monitor_every, bool) or self.monitor_every < 0):
            raise ValueError(f"monitor_every must be >= 0 (0: off) or None, got {self.monitor_every!r}")
        for name in ("monitor_size", "monitor_patches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.wandb is not None and not (isinstance(self.wandb, str) and self.wandb.strip()):
            raise ValueError(f"wandb must name a project, got {self.wandb!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.step_variant not in STEP_VARIANTS:
            raise ValueError(f"step_variant must be one of {', '.join(STEP_VARIANTS)}, got {self.step_variant!r}")
        if self.num_patches < 2:
            raise ValueError(f"num_patches must be >= 2 (the invariance term compares patches), got {self.num_patches}")
        if self.z_dim / (self.batch_size * self.eps) > FLOAT32_MAX:  # the coding rate's alpha, at most this large
            raise ValueError(
                f"--eps {self.eps:g} is too small for --z-dim {self.z_dim} and --batch-size {self.batch_size}: the "
                f"coding rate's d / (b eps) overflows float32"
            )
        if self.tcr_coef == 0 and self.inv_coef == 0:
            raise ValueError("--tcr-coef 0 and --inv-coef 0 leave no loss to minimise; give either a non-zero weight")
