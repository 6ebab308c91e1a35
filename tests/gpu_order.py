"""A pytest plugin (``-p gpu_order``) that runs the `gpu` tests as bench/gpu_check.sh plans them: in groups ordered by
value, each test step of the device check taking its own groups (docs/benchmarks.md section 5).

The first call's groups give a complete correctness verdict for what its timings time: the training step (eager,
captured), evaluation and NCCL, then the CUDA kernels the recipe's step runs (auto's choice on CUDA: the CUDA
extension's Total Coding Rate at the recipe's shapes and its auto choice, the CUDA augmentation), the optimiser,
the other CUDA shapes, the opchecks, other backbones' captured step (step ``tests``). The second call's: the
compiled step (step ``tests_compiled``, a cold Inductor compile: a step of its own), the composite loss and the Triton
sweeps (step ``sweeps``). A gpu test that no rule names falls into "other", in the first call: a new test is never
left out (tests/test_gpu_collection.py asks for a rule).

EMPSSL_GPU_TESTS=call1|call2 keeps one call's groups, EMPSSL_GPU_TESTS=STEP one step's (the others are deselected);
unset: every group, in order.
"""

import os
import re

# (group, the device check's step that runs it, rule on the test's node id): the first matching rule names the group;
# the groups run in this order
GROUPS = (
    (
        "training",
        "tests",
        r"tests/test_(train_step|train|monitor|store|evaluate|train_distributed|evaluate_distributed)\.py::"
        r"(?!.*compiled)",
    ),
    (
        "tcr-cuda-recipe",
        "tests",
        r"test_tcr_backends\.py::(test_gpu_forward_only_and_auto_choice|.*\[20-100-1024-.*-cuda\])",
    ),
    ("augment-cuda", "tests", r"test_augment_api\.py::|test_augment_backends\.py::(?!.*triton)"),
    ("optimiser", "tests", r"test_optim\.py::"),
    ("tcr-cuda", "tests", r"test_tcr_backends\.py::.*-cuda\]"),
    ("opcheck", "tests", r"test_opcheck\.py::(?!.*(triton|composite))"),
    ("backbones", "tests", r"test_backbone_runs\.py::"),  # other backbones' captured step: after the recipe's kernels
    ("other", "tests", None),  # every gpu test no other rule takes
    ("compiled", "tests_compiled", r"test_train_step\.py::.*compiled"),
    ("composite", "sweeps", r"test_tcr_backends\.py::.*-composite\]|test_opcheck\.py::.*composite"),
    (
        "triton-augment",
        "sweeps",
        r"test_augment_triton\.py::|test_augment_backends\.py::.*triton|test_opcheck\.py::test_augment",
    ),
    ("triton-tcr", "sweeps", r"test_tcr_triton\.py::|test_tcr_backends\.py::.*-triton\]|test_opcheck\.py::.*triton"),
)
CALL_ENV = "EMPSSL_GPU_TESTS"
CALL_OF_STEP = {"tests": 1, "tests_compiled": 2, "sweeps": 2}
# within the training group: the step the epoch rows time first, then the trainer, its monitoring, its reads from a
# store, the evaluation, NCCL
TRAINING_FILES = (
    "test_train_step",
    "test_train",
    "test_monitor",
    "test_store",
    "test_evaluate",
    "test_train_distributed",
    "test_evaluate_distributed",
)


def group_of(nodeid: str) -> str:
    """The group of a gpu test's node id (``tests/test_x.py::test_y[param]``)."""
    nodeid = nodeid if nodeid.startswith("tests/") else "tests/" + nodeid
    for name, _, rule in GROUPS:
        if rule is not None and re.search(rule, nodeid):
            return name
    return "other"


RANK = {name: index for index, (name, _, _) in enumerate(GROUPS)}


def _run_order(nodeid: str):
    group = group_of(nodeid)
    module = nodeid.split("::")[0].rsplit("/", 1)[-1][: -len(".py")]
    return RANK[group], TRAINING_FILES.index(module) if module in TRAINING_FILES else len(TRAINING_FILES)


STEP = {name: step for name, step, _ in GROUPS}
CALL = {name: CALL_OF_STEP[step] for name, step in STEP.items()}


def plan(nodeids):
    """(the node ids in the order they run, {group: count}) for ``EMPSSL_GPU_TESTS`` as set now."""
    wanted = os.environ.get(CALL_ENV, "")
    steps = tuple(CALL_OF_STEP)
    if wanted not in ("", "call1", "call2", *steps):
        raise ValueError(f"{CALL_ENV} must be call1 or call2 or one of {steps} (or unset: every group), got {wanted!r}")
    keep = [n for n in nodeids if wanted in ("", f"call{CALL[group_of(n)]}", STEP[group_of(n)])]
    ordered = sorted(keep, key=_run_order)  # stable: pytest's order within a group (a file)
    counts = {}
    for nodeid in ordered:
        counts[group_of(nodeid)] = counts.get(group_of(nodeid), 0) + 1
    return ordered, counts


def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    ordered, _ = plan([item.nodeid for item in gpu])
    by_id = {item.nodeid: item for item in gpu}
    kept = [by_id[nodeid] for nodeid in ordered]
    dropped = [item for item in items if item not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def pytest_report_collectionfinish(config, items):
    _, counts = plan([item.nodeid for item in items if "gpu" in item.keywords])
    call = os.environ.get(CALL_ENV) or "every call"
    return f"gpu test groups in order ({call}): " + ", ".join(f"{name} {count}" for name, count in counts.items())
