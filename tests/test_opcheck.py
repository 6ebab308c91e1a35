"""torch.library.opcheck on every custom op of empssl: schema, autograd registration, fake
(meta) implementation against the real one (shapes, strides, dtypes), and the op traced by
AOTAutograd with dynamic shapes against eager (values and gradients). On CPU tensors here
(the Triton ops through the interpreter), on CUDA tensors in the `gpu` tests."""

import dataclasses

import pytest
import torch

from empssl import backends
from empssl.augment.config import AugmentConfig
from empssl.augment.multipatch import sample_augment_params
from empssl.ops import augment as augment_op
from empssl.ops import tcr as tcr_op

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
# every op the package defines, and the backend whose check loads and registers it
OPS = {
    "tcr_forward_backward": ("tcr", "cpu"),
    "tcr_forward_backward_composite": ("tcr", "composite"),
    "tcr_forward_backward_triton": ("tcr", "triton"),
    "augment_patches": ("augment", "cpu"),
    "augment_patches_triton": ("augment", "triton"),
}
CUDA_BACKEND = {
    "cpu": "cuda",
    "composite": "composite",
    "triton": "triton",
}  # the backend of the same op on a CUDA tensor


def _require(op_name, device, *inputs):
    op, backend = OPS[op_name]
    device = torch.device(device)
    if device.type == "cuda":
        backend = CUDA_BACKEND[backend]
    why = backends.reasons(op, device, *inputs)[backend]
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")


def test_every_empssl_op_is_checked():
    backends.extension_reason()  # loads the extension, which defines its ops
    defined = {
        name.split("::", 1)[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("empssl::")
    }
    assert defined, "no empssl op is defined"
    assert defined == set(OPS), (
        f"ops without an opcheck: {sorted(defined - set(OPS))}; stale: {sorted(set(OPS) - defined)}"
    )


# ---- Total Coding Rate: (z, alpha, need_grad) -> (R, dR/dz) --------------------------------

TCR_OPS = {
    "tcr_forward_backward": lambda: torch.ops.empssl.tcr_forward_backward.default,
    "tcr_forward_backward_composite": lambda: torch.ops.empssl.tcr_forward_backward_composite.default,
    "tcr_forward_backward_triton": lambda: tcr_op.tcr_forward_backward_triton,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", sorted(TCR_OPS))
@pytest.mark.parametrize("shape", [(2, 5, 12), (2, 9, 6)], ids=["b<d", "b>d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("need_grad", [True, False], ids=["grad", "forward"])
def test_tcr_op(device, op_name, shape, dtype, need_grad):
    z = torch.randn(shape, device=device).to(dtype)
    if device == "cuda" and op_name == "tcr_forward_backward" and shape[1] > shape[2]:
        # the CUDA kernel takes b <= d only; dispatch sends b > d to the composite, and the op itself refuses it
        assert "composite backend takes these" in backends.reasons("tcr", z.device, z)["cuda"]
        with pytest.raises(RuntimeError, match="backend 'composite' takes the others"):
            TCR_OPS[op_name]()(z, tcr_op.coding_rate_alpha(shape[1], shape[2], 0.2), need_grad)
        return
    _require(op_name, device, z)
    alpha = tcr_op.coding_rate_alpha(shape[1], shape[2], 0.2)
    # the gradient exists only when the forward computed it (need_grad), so only then may z require grad
    z.requires_grad_(need_grad)
    torch.library.opcheck(TCR_OPS[op_name](), (z, alpha, need_grad))


# ---- Multi-patch augmentation --------------------------------------------------------------


def _augment_inputs(device, num_patches=3):
    config = dataclasses.replace(AugmentConfig.cifar(), output_size=16, blur_kernel_size=5)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    images = torch.randint(0, 256, (2, 20, 24, 3), dtype=torch.uint8, generator=generator)
    source_index, params = sample_augment_params(config, 2, num_patches, 20, 24, generator=generator)
    return config, images.to(device), source_index.to(device), params.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["augment_patches", "augment_patches_triton"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_augment_op(device, op_name, out_dtype, channels_last):
    config, images, source_index, params = _augment_inputs(device)
    _require(op_name, device, images, source_index, params, config)
    common = (
        images,
        source_index,
        params,
        config.output_size,
        config.blur_kernel_size,
        float(config.solarize_threshold),
        [float(m) for m in config.mean],
        [float(s) for s in config.std],
    )
    if op_name == "augment_patches":
        op, args = torch.ops.empssl.augment_patches.default, common + (config.jitter_op_mask(),)
    else:
        op, args = augment_op.augment_patches_triton, common + (config.jitter_op_mask(),)
    torch.library.opcheck(op, args + (out_dtype, channels_last))
