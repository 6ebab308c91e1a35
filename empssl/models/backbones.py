"""Backbones by name (docs/training.md section 8): the built-in ResNet-18s, ``torchvision:NAME`` and ``timm:NAME``.

``--arch`` names one of three sources:

- ``resnet18-cifar`` / ``resnet18-imagenet``: empssl's own ResNet-18 (``empssl.models.resnet``), the only one with
  ``--width``; its stem is part of its name.
- ``torchvision:NAME``: any classification model of ``torchvision.models`` (``torchvision.models.get_model(NAME,
  weights=None, **backbone_args)``) with its classifier (the last Linear with ``num_classes`` outputs) replaced by
  an Identity, so it returns the features the classifier read.
- ``timm:NAME``: any timm model (an optional dependency), ``timm.create_model(NAME, pretrained=False,
  num_classes=0, **backbone_args)``, which returns its pooled pre-logit features.

No weights are ever downloaded: every backbone starts from its library's random initialisation. ``backbone_args``
(``--backbone-args KEY=VALUE,...``) are the model constructor's keyword arguments, e.g. ``img_size=32`` for a timm
ViT on 32x32 images. ``stem="cifar"`` swaps a ResNet's 7x7 stride-2 ``conv1`` and its ``maxpool`` for a 3x3
stride-1 conv and no pooling, as ``resnet18-cifar`` has. Options that do not apply to a backbone are refused with
the reason.

The feature size is found, never listed: one forward of the backbone with its weights on the ``meta`` device (no
memory, no compute), at the first of a few usual image sizes the model takes; a tiny real forward where an op has
no meta kernel.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import re
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .resnet import ARCHS as BUILTIN_ARCHS
from .resnet import ResNet18Backbone

SOURCES = ("torchvision", "timm")
STEMS = ("default", "cifar")
TIMM_MISSING = "optional dependency not installed: timm"
# the constructor's arguments empssl sets itself: weights are never loaded, the classifier is the projector's place
RESERVED_ARGS = (
    "weights",
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
    "num_classes",
    "features_only",
    "progress",
)
# image sizes the feature-size probe tries after the one --backbone-args names (img_size, image_size), most usual
# first: a transformer takes only the size it was built for
PROBE_SIZES = (224, 32, 64, 96, 128, 160, 192, 256, 288, 299, 320, 384, 448, 512, 518, 16, 8)
SIZE_ARGS = ("img_size", "image_size")  # timm's and torchvision's name of the size a transformer is built for
ARCH_HELP = (
    "backbone: resnet18-cifar or resnet18-imagenet (built in: ResNet-18 with the CIFAR or ImageNet stem), "
    "torchvision:NAME (any torchvision classification model, e.g. torchvision:resnet50, torchvision:vit_b_16) or "
    "timm:NAME (any timm model, e.g. timm:vit_tiny_patch16_224; needs the timm package); never pretrained: every "
    "backbone starts from random initialisation"
)


class BackboneError(ValueError):
    """A backbone that cannot be built as asked; the message says why and what to do."""


def parse_arch(arch: str) -> Tuple[str, str]:
    """(source, name): ("empssl", "resnet18-cifar"), ("torchvision", "resnet50"), ("timm", "vit_tiny_patch16_224")."""
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a string, got {type(arch).__name__}")
    if arch in BUILTIN_ARCHS:
        return "empssl", arch
    source, colon, name = arch.partition(":")
    if not colon or source not in SOURCES:
        import torchvision

        hint = (
            f" (did you mean torchvision:{arch}?)"
            if arch in torchvision.models.list_models(module=torchvision.models)
            else ""
        )
        raise BackboneError(
            f"unknown --arch {arch!r}{hint}: use {' or '.join(BUILTIN_ARCHS)} (built in), torchvision:NAME or timm:NAME"
        )
    if not name.strip() or name != name.strip():
        raise BackboneError(f"--arch {arch!r} names no model after {source}: (e.g. {source}:resnet50)")
    return source, name


def _import_timm():
    try:
        import timm
    except ImportError as err:
        raise BackboneError(
            f"timm: backbones need the timm package ({TIMM_MISSING} here): pip install timm, or use a "
            f"torchvision: or built-in backbone"
        ) from err
    return timm


def _unknown(arch: str, name: str, known) -> BackboneError:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(arch.split(':')[0] + ':' + c for c in close)}?" if close else ""
    return BackboneError(f"--arch {arch}: {arch.split(':')[0]} has no model {name!r}{hint}")


def check_arch(arch: str) -> str:
    """``arch`` if it names a backbone that exists here (timm installed for ``timm:``), else BackboneError."""
    source, name = parse_arch(arch)
    if source == "torchvision":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)  # classification models only
        if name not in known:
            raise _unknown(arch, name, known)
    elif source == "timm":
        timm = _import_timm()
        if not timm.is_model(name):
            raise _unknown(arch, name, timm.list_models())
    return arch


def arch_type(text: str) -> str:
    """argparse type of ``--arch``: the name checked, a clear line when it is not usable."""
    import argparse

    try:
        return check_arch(text)
    except BackboneError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_ARG_SPLIT = re.compile(r",\s*(?=[A-Za-z_]\w*\s*=)")  # a comma that starts the next KEY=


def parse_backbone_args(value) -> Dict[str, Any]:
    """``KEY=VALUE[,KEY=VALUE...]`` (values as Python literals, other text as strings) or a dict, as a dict."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        args = dict(value)
    elif isinstance(value, str):
        args = {}
        for item in _ARG_SPLIT.split(value.strip()):
            key, equals, text = item.partition("=")
            key = key.strip()
            if not equals or not key.isidentifier():
                raise BackboneError(
                    f"--backbone-args {value!r}: expected KEY=VALUE pairs separated by commas (e.g. "
                    f"img_size=32,patch_size=8), got {item!r}"
                )
            try:
                args[key] = ast.literal_eval(text.strip())
            except (ValueError, SyntaxError):
                args[key] = text.strip()  # a bare word: a string (act_layer=gelu)
    else:
        raise TypeError(f"backbone_args must be a dict or KEY=VALUE text, got {type(value).__name__}")
    for key in args:
        if not isinstance(key, str) or not key.isidentifier():
            raise BackboneError(f"--backbone-args: {key!r} is not a keyword argument name")
    reserved = sorted(set(args) & set(RESERVED_ARGS))
    if reserved:
        raise BackboneError(
            f"--backbone-args may not set {', '.join(reserved)}: empssl never loads weights (every backbone starts "
            f"from random initialisation) and replaces the classifier with its projector"
        )
    return args


def format_backbone_args(args: Dict[str, Any]) -> str:
    """The ``--backbone-args`` text of a dict (``parse_backbone_args`` gives it back)."""
    return ",".join(f"{key}={value!r}" for key, value in args.items())


def backbone_args_text(value) -> str:
    """The ``--backbone-args`` text of a dict (or text), ValueError unless it reads back to the same values: a
    keyword argument whose value is no Python literal (a class, a function) has no text."""
    args = parse_backbone_args(value)
    text = format_backbone_args(args)
    if parse_backbone_args(text) != args:
        raise ValueError(
            f"backbone_args {args!r} has no --backbone-args text that reads back to it (each value a Python literal), "
            f"which the run folder's config.toml must hold to rerun the run"
        )
    return text


def backbone_args_type(text: str) -> str:
    """argparse type of ``--backbone-args``: the text, checked."""
    import argparse

    try:
        parse_backbone_args(text)
    except BackboneError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def check_options(arch: str, width: float = 1.0, stem: str = "default", backbone_args=None) -> None:
    """BackboneError for an option the backbone does not take (what a model must be built to know is checked when it
    is built: ``build_backbone``)."""
    source, _ = parse_arch(arch)
    args = parse_backbone_args(backbone_args)
    if stem not in STEMS:
        raise BackboneError(f"--stem must be one of {STEMS}, got {stem!r}")
    if source == "empssl":
        if args:
            raise BackboneError(
                f"--backbone-args are the keyword arguments of a torchvision: or timm: model's constructor; the "
                f"built-in {arch} takes --width and names its stem in --arch"
            )
        if stem != "default":
            raise BackboneError(
                "--stem cifar is for torchvision: and timm: ResNets; the built-in ResNet-18 names its stem in --arch: "
                "use --arch resnet18-cifar"
            )
        return
    if width != 1.0:
        raise BackboneError(
            f"--width scales the channels of the built-in ResNet-18 only; {arch} has its library's widths (pick "
            f"a model of another size, or pass its constructor's arguments with --backbone-args)"
        )


@dataclasses.dataclass
class Backbone:
    """A built backbone: ``module`` maps images (N, 3, H, W) to features (N, ``feature_dim``).

    ``source``/``name``: from ``parse_arch``; ``removed_head``: the torchvision classifier replaced by an Identity
    (its module path, e.g. ``fc``), None for the others."""

    module: nn.Module
    feature_dim: int
    source: str
    name: str
    removed_head: Optional[str] = None


def build_backbone(arch: str, width: float = 1.0, stem: str = "default", backbone_args=None) -> Backbone:
    """The backbone ``arch`` names, at random initialisation (built on the current default device)."""
    check_options(arch, width, stem, backbone_args)
    source, name = parse_arch(arch)
    if source == "empssl":
        module = ResNet18Backbone(arch, width)
        return Backbone(module, module.feature_dim, source, name)
    args = parse_backbone_args(backbone_args)
    check_arch(arch)
    removed_head, head_inputs = None, None
    try:
        if source == "torchvision":
            import torchvision

            module = torchvision.models.get_model(name, weights=None, **args)
        else:
            module = _import_timm().create_model(name, pretrained=False, num_classes=0, **args)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        given = f" with --backbone-args {format_backbone_args(args)}" if args else ""
        raise BackboneError(f"--arch {arch} cannot be built{given}: {err}") from err
    if source == "torchvision":
        removed_head, head_inputs = _remove_classifier(module, arch)
    if stem == "cifar":
        _cifar_stem(module, arch)
    named = [args[key] for key in SIZE_ARGS if key in args]
    feature_dim = probe_feature_dim(module, arch, named + list(PROBE_SIZES))
    if head_inputs is not None and head_inputs != feature_dim:
        raise BackboneError(
            f"--arch {arch}: with its classifier {removed_head} removed it returns {feature_dim} features, not the "
            f"{head_inputs} the classifier read (the classifier is not its last layer): choose another model"
        )
    return Backbone(module, feature_dim, source, name, removed_head)


def _remove_classifier(module: nn.Module, arch: str) -> Tuple[str, int]:
    """Replace the last Linear with 1000 outputs (torchvision's class count) by an Identity: (its path, its
    inputs)."""
    linears = [(path, m) for path, m in module.named_modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    if not linears:
        raise BackboneError(
            f"--arch {arch} has no Linear classifier with 1000 outputs for the projector to take the place of (its "
            f"classifier is another kind of layer): choose another model"
        )
    path, head = linears[-1]
    parent, _, child = path.rpartition(".")
    setattr(module.get_submodule(parent), child, nn.Identity())
    return path, head.in_features


def _cifar_stem(module: nn.Module, arch: str) -> None:
    conv, pool = getattr(module, "conv1", None), getattr(module, "maxpool", None)
    if not (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (7, 7)
        and conv.stride == (2, 2)
        and isinstance(pool, (nn.MaxPool2d, nn.Identity))
    ):
        raise BackboneError(
            f"--stem cifar replaces a ResNet's stem (conv1, one 7x7 stride-2 convolution, and maxpool) with a 3x3 "
            f"stride-1 convolution and no pooling; {arch} has no such stem: use --stem default"
        )
    module.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
    nn.init.kaiming_normal_(module.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's and timm's
    module.maxpool = nn.Identity()


def probe_feature_dim(module: nn.Module, arch: str, sizes=PROBE_SIZES) -> int:
    """The size of the (N, D) features ``module`` returns, from one forward on the meta device, at the first of
    ``sizes`` (an int or (height, width)) it takes. Where an op has no meta kernel: a tiny real forward in eval mode
    if the module's weights are real; a BackboneError if they are on the meta device, where train, eval and export
    build every encoder first (so such a backbone works only through the Python API, built on a real device)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    state = {name: torch.empty_like(t, device="meta") for name, t in tensors}
    errors = []
    for size in sizes:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        images = torch.empty(2, 3, height, width, device="meta")
        try:
            out = torch.func.functional_call(module, state, (images,))
        except NotImplementedError as err:  # an op without a meta kernel: a real forward
            out = _real_forward(module, arch, (height, width), err)
        except Exception as err:  # noqa: BLE001 - the model's own refusal of this size: try the next
            out = err
        if isinstance(out, Exception):
            errors.append(f"{height}x{width}: {str(out).splitlines()[0] if str(out) else type(out).__name__}")
            continue
        return _feature_dim(out, arch)
    raise BackboneError(
        f"--arch {arch} takes none of the image sizes {', '.join(map(str, sizes))} (first: {errors[0]}); "
        f"pass the size it should take with --backbone-args (timm: img_size=32; torchvision ViTs: image_size=32)"
    )


def _real_forward(module: nn.Module, arch: str, size: Tuple[int, int], why: Exception):
    """The output of a tiny real forward in eval mode, or the exception that refused this size."""
    was_training = module.training
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if device.type == "meta":
        raise BackboneError(
            f"--arch {arch} cannot be sized on the meta device, where empssl builds an encoder before allocating it: "
            f"an op has no meta kernel ({str(why).splitlines()[0] if str(why) else type(why).__name__})"
        ) from why
    try:
        with torch.no_grad():
            return module.eval()(torch.zeros(2, 3, *size, device=device))
    except Exception as err:  # noqa: BLE001 - this size is refused: the caller tries the next
        return err
    finally:
        module.train(was_training)


def _feature_dim(out, arch: str) -> int:
    if not isinstance(out, torch.Tensor):
        raise BackboneError(
            f"--arch {arch} returns a {type(out).__name__} in training mode, not one (N, features) tensor (models "
            f"with auxiliary classifiers: turn them off, e.g. --backbone-args aux_logits=False)"
        )
    if out.ndim != 2:
        raise BackboneError(
            f"--arch {arch} returns outputs of shape {tuple(out.shape)} for 2 images; EMP-SSL needs one feature "
            f"vector per image, (N, D)"
        )
    return int(out.shape[1])
