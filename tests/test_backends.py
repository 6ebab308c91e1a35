import pytest
import torch

import empssl
from empssl import backends
from empssl.ops import tcr as tcr_op


def test_unknown_backend_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'fastest'.*'reference'"):
        empssl.coding_rate(torch.randn(3, 4, 8), backend="fastest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_unavailable_backend_says_why():
    with pytest.raises(empssl.BackendUnavailableError, match="cuda"):
        empssl.coding_rate(torch.randn(3, 4, 8), backend="cuda")


def test_auto_resolves_to_an_available_backend_and_reference_always_works():
    z = torch.randn(2, 5, 8)
    chosen = backends.select_backend("tcr", "auto", z.device, z)
    assert backends.reasons("tcr", z.device, z)[chosen] is None
    assert backends.select_backend("tcr", "reference", z.device, z) == "reference"


def test_availability_table_covers_every_op_device_and_backend():
    rows = backends.availability_table()
    ops = {op for op, *_ in rows}
    assert "tcr" in ops
    for op in ops:
        for device in ("cpu", "cuda"):
            names = [name for o, dev, name, _ in rows if o == op and dev == device]
            assert sorted(names) == sorted(backends.BACKENDS)
    # every unavailable backend carries a reason a person can read
    assert all(why is None or (isinstance(why, str) and len(why) > 10) for *_, why in rows)
    if not torch.cuda.is_available():
        assert all(why is not None for _, dev, _, why in rows if dev == "cuda")


def test_resolution_runs_the_checks_once_per_facts_and_clear_forgets(monkeypatch):
    entry = tcr_op.BACKENDS["reference"]
    calls = []
    check = entry.check
    monkeypatch.setattr(entry, "check", lambda device, z: calls.append(tuple(z.shape[1:])) or check(device, z))
    backends.clear_resolved()
    z = torch.randn(3, 5, 8)
    first = empssl.coding_rate(z, backend="reference")
    again = empssl.coding_rate(torch.randn(7, 5, 8), backend="reference")  # n is not a fact the checks read
    assert calls == [(5, 8)] and first.shape == (3,) and again.shape == (7,)
    empssl.coding_rate(torch.randn(3, 6, 8), backend="reference")  # another b: checked again
    empssl.coding_rate(z.double(), backend="reference")  # another dtype: checked again
    assert calls == [(5, 8), (6, 8), (5, 8)]
    backends.clear_resolved()
    empssl.coding_rate(z, backend="reference")
    assert calls == [(5, 8), (6, 8), (5, 8), (5, 8)]
    backends.clear_resolved()  # the swapped check must not outlive this test


def test_a_refusal_is_not_remembered(monkeypatch):
    entry = tcr_op.BACKENDS["cuda"]
    calls = []
    check = entry.check
    monkeypatch.setattr(entry, "check", lambda device, z: calls.append(device) or check(device, z))
    backends.clear_resolved()
    z = torch.randn(2, 4, 8)
    for _ in range(2):  # the second call says why again rather than answering from the cache
        with pytest.raises(
            empssl.BackendUnavailableError, match="backend 'cuda' is not available: the cuda backend runs on CUDA"
        ):
            empssl.coding_rate(z, backend="cuda")
    assert len(calls) == 2
    backends.clear_resolved()


def test_every_backend_says_what_it_supports():
    for op in ("tcr", "augment"):
        for name in backends.BACKENDS:
            text = backends.supports(op, name)
            assert text == "-" or len(text) > 10
    assert "b <= d and b <= 128" in backends.supports("tcr", "cuda")
    assert "any b, d" in backends.supports("tcr", "composite")


def test_the_triton_limits_in_words_are_the_kernels():
    triton_augment = pytest.importorskip("empssl.kernels.augment")
    triton_tcr = pytest.importorskip("empssl.kernels.tcr")
    assert f"output_size <= {triton_augment.MAX_OUTPUT_SIZE} " in backends.supports("augment", "triton")
    assert f"b <= {triton_tcr.MAX_B} " in backends.supports("tcr", "triton")


def test_the_cuda_row_limit_is_the_kernels():
    if backends.extension_reason() or not backends.extension().with_cuda:
        pytest.skip("needs a CUDA GPU: the extension was built without its CUDA part")
    max_rows = backends.extension().tcr_cuda_max_rows()
    assert f"b <= {max_rows}" in backends.supports("tcr", "cuda")
