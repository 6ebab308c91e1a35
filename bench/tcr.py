"""Total Coding Rate forward+backward: the fused backends against the torch formulations.

Methods, side by side in one run (each: R of n groups, then dR/dZ of a sum of R):
  naive           the authors' formula: Python loop of d x d torch.logdet
  batched_logdet  torch.logdet of all (n, d, d) matrices I + alpha Z^T Z at once
  composite       empssl's reference: b x b Sylvester side, cholesky_ex, autograd
  cpu/cuda/triton empssl's fused backends, where available on the device
Low-precision inputs go to naive / batched_logdet as float32 (torch.logdet needs it).
Median over repeats (CUDA events on GPU). On GPU the achieved bandwidth is reported
against the floor of reading Z twice (Gram pass + gradient pass) and writing dR/dZ once.

  python bench/tcr.py --out results/            # b=100, d=1024, n in {20, 200}, float32 + bf16
  python bench/tcr.py --quick --out results/    # n=20 only, fewer repeats (< 60 s on a 2-core CPU)

Measured on the 2-core AVX-512 CPU (shared with other jobs), torch 2.14.1, n=20, b=100, d=1024,
forward+backward, --quick --repeats 31, medians of 5 runs, 2 threads:
  float32: naive 684 ms, batched_logdet 679 ms, composite 23.5 ms, cpu 14.3 ms (1.64x composite, 48x naive)
  bf16:    naive 683 ms, batched_logdet 642 ms, composite 20.1 ms, cpu 11.0 ms (1.83x composite, 62x naive)
  1 thread, one run: float32 cpu 16.0 vs composite 23.5 ms; bf16 18.5 vs 24.1 ms
The cpu backend accumulates in float64 (exact on collapsed Z, where the float32 composite loses
up to 2e-2 of the gradient). Compare only methods of one run.
"""
import argparse
import csv
import os
import statistics
import sys
import time

import torch

import empssl
from empssl import backends, coding_rate
from empssl.reference import tcr as reference_tcr

EPS = 0.2


def naive(z):
    return reference_tcr.coding_rate_published(z if z.dtype in (torch.float32, torch.float64) else z.float(), EPS)


def batched_logdet(z):
    x = z if z.dtype in (torch.float32, torch.float64) else z.float()
    n, b, d = x.shape
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return torch.logdet(torch.baddbmm(eye.expand(n, d, d), x.transpose(1, 2), x, alpha=d / (b * EPS))) / 2


def backend_method(name):
    return lambda z: coding_rate(z, EPS, backend=name)


def methods_for(z):
    found = {"naive": naive, "batched_logdet": batched_logdet, "composite": backend_method("reference")}
    skipped = {}
    for name in ("cpu", "cuda", "triton"):
        reason = backends.reasons("tcr", z.device, z)[name]
        if name == "triton" and z.device.type == "cpu":
            reason = "the Triton interpreter on CPU is a correctness tool, not a backend to time"
        if reason is None:
            found[name] = backend_method(name)
        else:
            skipped[name] = reason
    return found, skipped


def time_fwd_bwd(fn, z, repeats, warmup_groups=None):
    """Median seconds of R = fn(z); dR/dZ of sum(R), after a warm-up call (on the first
    ``warmup_groups`` groups only, for methods that take seconds per call)."""
    x = z.detach().clone().requires_grad_()

    def run(inputs=x):
        rate = fn(inputs)
        torch.autograd.grad(rate.sum(), inputs)

    run(x if warmup_groups is None else x[:warmup_groups].detach().clone().requires_grad_())
    times = []
    for _ in range(repeats):
        if z.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for tcr.csv (and tcr.png)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="groups (patches per image)")
    parser.add_argument("--b", type=int, default=100)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--naive-max-n", type=int, default=None, help="skip the naive loop above this n")
    parser.add_argument("--quick", action="store_true", help="n=20 only, few repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (also used by the cpu kernel)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    n_values = args.n or ([20] if args.quick else [20, 200])
    repeats = args.repeats or (3 if args.quick else (20 if on_gpu else 5))
    naive_max_n = args.naive_max_n if args.naive_max_n is not None else (200 if on_gpu else 20)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # IEEE float32 Gram for every method

    header = f"device: {device_name(device)} | torch {torch.__version__} | empssl {empssl.__version__}"
    if on_gpu:
        header += f" | CUDA {torch.version.cuda}"
    try:
        import triton

        header += f" | triton {triton.__version__}"
    except ImportError:
        pass
    print(header)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for n in n_values:
            z = torch.nn.functional.normalize(torch.randn(n, args.b, args.d, generator=generator), dim=-1)
            z = z.to(device=device, dtype=dtype)
            methods, skipped = methods_for(z)
            for name, reason in skipped.items():
                print(f"  skip {name}: {reason}")
            for name, fn in methods.items():
                if name == "naive" and n > naive_max_n:
                    print(f"  skip naive at n={n} (> --naive-max-n {naive_max_n})")
                    continue
                slow = name in ("naive", "batched_logdet")  # seconds per call on a CPU
                if slow and not on_gpu:
                    seconds = time_fwd_bwd(fn, z, 1 if args.quick else 3, warmup_groups=1)
                else:
                    seconds = time_fwd_bwd(fn, z, repeats)
                bytes_floor = 3 * z.numel() * z.element_size()  # read Z twice, write dR/dZ once
                rows.append(
                    dict(
                        device=device_name(device), dtype=dtype_name, n=n, b=args.b, d=args.d, method=name,
                        ms=round(seconds * 1e3, 3), patches_per_s=round(n * args.b / seconds),
                        gb_per_s_vs_floor=round(bytes_floor / seconds / 1e9, 1) if on_gpu else "",
                    )
                )
                print(f"  {dtype_name:9s} n={n:4d} {name:15s} {seconds * 1e3:10.2f} ms", flush=True)

    print("\nspeed-ups (time of the method / time of each fused backend):")
    for dtype_name in args.dtypes:
        for n in n_values:
            group = {r["method"]: r["ms"] for r in rows if r["dtype"] == dtype_name and r["n"] == n}
            for fast in ("cpu", "cuda", "triton"):
                if fast in group:
                    ratios = ", ".join(f"{m} {group[m] / group[fast]:.1f}x" for m in group if m != fast)
                    print(f"  {dtype_name} n={n} {fast}: {ratios}")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tcr.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot")
        return 0
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['dtype']} n={r['n']}\n{r['method']}" for r in rows]
    ax.barh(range(len(rows)), [r["ms"] for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("forward+backward ms (log)")
    ax.set_title(header, fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "tcr.png"), dpi=120)
    print(f"wrote {os.path.join(args.out, 'tcr.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
