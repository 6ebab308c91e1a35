"""The tests' tiny training run (4 steps per epoch of 16 synthetic 8x8 images, a 1/8-width encoder, on one CPU
thread), as TrainConfig fields and as the same options on the command line."""

TINY = dict(
    dataset="synthetic", image_size=8, train_size=64, width=0.125, hidden_dim=32, z_dim=16, num_patches=2,
    batch_size=16, device="cpu", progress=False, log_every=1,
)  # fmt: skip
TINY_ARGS = (
    "--dataset synthetic --image-size 8 --train-size 64 --width 0.125 --hidden-dim 32 --z-dim 16 --num-patches 2 "
    "--batch-size 16 --device cpu --log-every 1 --threads 1 --no-progress"
).split()


def checkpoint_readers(checkpoint, out_dir, export_to):
    """The commands that read a checkpoint (eval, export, train --resume into ``out_dir``): a bad one must be refused
    by each alike."""
    return (
        ["eval", "--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"],
        ["export", "--checkpoint", str(checkpoint), "--out", str(export_to)],
        ["train", *TINY_ARGS, "--out-dir", str(out_dir), "--resume", str(checkpoint)],
    )
