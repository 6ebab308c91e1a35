"""Total Coding Rate forward+backward: the fused backends against the torch formulations and peers.

Methods, side by side in one run (each: R of n groups of (b, d), then dR/dZ of a sum of R):
  naive           the published formula: a Python loop of d x d torch.logdet
  batched_logdet  torch.logdet of all (n, d, d) matrices I + alpha Z^T Z at once (on the CPU with
                  one thread: torch 2.14's multi-threaded CPU logdet of such batches is wrong)
  composite       empssl's reference: b x b Sylvester side, cholesky_ex, autograd
  cpu/cuda/triton empssl's fused backends, where they run on the device
  lightly         lightly's EMPSSLLoss (whole loss, inverted coding-rate sign), where installed,
                  next to empssl's EMPSSLLoss on the same views
naive / batched_logdet (torch.logdet needs float32) and the whole-loss rows run in float32 whatever the
input dtype, so they appear once per shape, in the float32 rows, not again for bf16. Medians over
repeats (CUDA events on a GPU). The limit is the device copy bandwidth measured in the same run,
against the floor of reading Z twice (Gram pass + gradient pass) and writing dR/dZ once.

  empssl bench tcr                 # GPU: b=100, d=1024, n in {20, 200}, float32 + bf16
  empssl bench tcr --quick         # CPU-sized: n=20 (under a minute on 2 cores)
"""

from __future__ import annotations

import contextlib

import torch

from .. import backends
from ..device import set_tf32, tf32_settings
from ..loss import EMPSSLLoss, coding_rate
from ..reference import tcr as reference_tcr
from . import common

EPS = 0.2


def naive(z):
    return reference_tcr.coding_rate_published(z if z.dtype in (torch.float32, torch.float64) else z.float(), EPS)


@contextlib.contextmanager
def _torch_threads(count):
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def batched_logdet(z):
    x = z if z.dtype in (torch.float32, torch.float64) else z.float()
    n, b, d = x.shape
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return torch.logdet(torch.baddbmm(eye.expand(n, d, d), x.transpose(1, 2), x, alpha=d / (b * EPS))) / 2


def _fwd_bwd(fn, z):
    x = z.detach().requires_grad_()

    def run():
        rate = fn(x)
        torch.autograd.grad(rate.sum(), x)

    return run


def _lightly_loss():
    from lightly.loss import EMPSSLLoss as LightlyEMPSSLLoss  # noqa: N811

    return LightlyEMPSSLLoss(tcr_eps=EPS, inv_coef=200.0)


def main(argv=None) -> int:
    parser = common.make_parser("tcr", __doc__)
    parser.add_argument("--n", type=int, nargs="+", default=None, help="groups (patches per image)")
    parser.add_argument("--b", type=int, default=None, help="images per group (default 100)")
    parser.add_argument("--d", type=int, default=None, help="embedding dimension (default 1024)")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"]
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--naive-max-n", type=int, default=None, help="skip the naive loop above this n")
    args = parser.parse_args(argv)
    results = common.open_results("tcr", args)
    set_tf32(False, tf32_settings()[1])  # IEEE float32 Gram for every method (as TrainConfig's default)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    b = args.b or (16 if args.tiny else 100)
    d = args.d or (32 if args.tiny else 1024)
    n_values = args.n or ([2] if args.tiny else [20] if args.quick or not on_gpu else [20, 200])
    repeats = args.repeats or (1 if args.tiny else 3 if args.quick or not on_gpu else 20)
    naive_max_n = args.naive_max_n if args.naive_max_n is not None else (200 if on_gpu else 20)
    bandwidth = common.copy_bandwidth(device, megabytes=16 if args.tiny else 256)
    results.note(f"device copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    try:
        lightly_loss = _lightly_loss()
    except ImportError:
        lightly_loss = None
        results.note("lightly not installed: no lightly row")
    generator = torch.Generator().manual_seed(0)
    # naive, batched_logdet and the whole-loss rows compute in float32 whatever the input dtype: one row each per
    # shape (in the float32 rows, or in the first dtype's rows, labelled float32, when float32 is not asked for)
    float32_dtype = "float32" if "float32" in args.dtypes else args.dtypes[0]
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        float32_rows = dtype_name == float32_dtype
        if not float32_rows:
            results.note(
                f"{dtype_name}: naive, batched_logdet and the whole-loss rows compute in float32: "
                f"their rows are the {float32_dtype} ones above"
            )
        for n in n_values:
            z = torch.nn.functional.normalize(torch.randn(n, b, d, generator=generator), dim=-1).to(device, dtype)
            case = f"n={n} b={b} d={d}"
            bytes_floor = 3 * z.numel() * z.element_size()  # read Z twice, write dR/dZ once

            def record(method, run, note="", slow=False, label=dtype_name):
                # the d x d methods take seconds per call on a CPU (one timed call there), ~1 s at n=200 on a GPU
                with results.row(case, method, label):  # an error (out of memory, say) is this row's; the next runs
                    seconds = common.time_call(run, device, (min(repeats, 3) if on_gpu else 1) if slow else repeats)
                    results.add(
                        case,
                        method,
                        seconds,
                        n / seconds,
                        "groups/s",
                        label,
                        bytes_floor / seconds / bandwidth,
                        "copy GB/s",
                        note,
                    )

            if float32_rows:
                if n <= naive_max_n:
                    record(
                        "naive", _fwd_bwd(naive, z), "published d x d logdet loop; float32", slow=True, label="float32"
                    )
                else:
                    results.note(f"naive skipped at n={n} (> --naive-max-n {naive_max_n})")
                if on_gpu:
                    record("batched_logdet", _fwd_bwd(batched_logdet, z), "float32", slow=True, label="float32")
                else:
                    with _torch_threads(1):
                        record(
                            "batched_logdet",
                            _fwd_bwd(batched_logdet, z),
                            "float32; 1 thread: torch 2.14.1 gave wrong multi-threaded CPU batched logdets",
                            slow=True,
                            label="float32",
                        )
            record("composite", _fwd_bwd(lambda x: coding_rate(x, EPS, backend="reference"), z), "backend=reference")
            why_not = backends.reasons("tcr", device, z)
            for name in ("cpu", "cuda", "triton"):
                if name == "triton" and not on_gpu:
                    continue  # the interpreter on a CPU is a correctness tool, not a backend to time
                if why_not[name] is None:
                    record(name, _fwd_bwd(lambda x, name=name: coding_rate(x, EPS, backend=name), z), "fused")
                elif (name == "cpu") != on_gpu:
                    results.note(f"{name} skipped: {why_not[name]}")
            if lightly_loss is not None and float32_rows:
                ours = EMPSSLLoss(eps=EPS)
                lightly_run = _fwd_bwd(lambda x: lightly_loss(list(x.unbind(0))), z.float())
                if on_gpu:
                    record(
                        "lightly EMPSSLLoss",
                        lightly_run,
                        "whole loss; inverted coding-rate sign",
                        slow=True,
                        label="float32",
                    )
                else:  # its batched d x d logdet: the same multi-threaded torch bug as batched_logdet
                    with _torch_threads(1):
                        record(
                            "lightly EMPSSLLoss",
                            lightly_run,
                            "whole loss; inverted coding-rate sign; 1 thread",
                            slow=True,
                            label="float32",
                        )
                record("empssl EMPSSLLoss", _fwd_bwd(ours, z.float()), "whole loss, same views", label="float32")
    return common.finish(results, args)


if __name__ == "__main__":
    raise SystemExit(main())
