import pytest
import torch

import empssl
from empssl import backends


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
