"""float32_precision and the TF32 helpers work whichever of torch's two TF32 APIs a caller used (the legacy
``allow_tf32`` flags or, since torch 2.9, the ``fp32_precision`` switches), set both consistently inside and leave a
caller's settings as they were."""

import pytest
import torch

from empssl.device import float32_precision, set_tf32, tf32_settings

SWITCHES = {
    "global": torch.backends,
    "cudnn": torch.backends.cudnn,
    "matmul": torch.backends.cuda.matmul,
    "conv": torch.backends.cudnn.conv,
    "rnn": torch.backends.cudnn.rnn,
    "mkldnn_matmul": torch.backends.mkldnn.matmul,
}


def _read(what):
    try:
        return what()
    except RuntimeError:
        return "raises"


def _everything():
    """Every switch's own value and what each legacy reader answers (or that it raises)."""
    return (
        {name: switch.fp32_precision for name, switch in SWITCHES.items()},
        _read(lambda: torch.backends.cuda.matmul.allow_tf32),
        _read(lambda: torch.backends.cudnn.allow_tf32),
        _read(torch.get_float32_matmul_precision),
    )


CALLERS = {
    "torch defaults": lambda: None,
    "new API, global tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
    "new API, matmul tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "new API, conv ieee": lambda: setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
    "legacy API": lambda: (
        setattr(torch.backends.cuda.matmul, "allow_tf32", True),
        setattr(torch.backends.cudnn, "allow_tf32", False),
    ),
    "matmul precision medium": lambda: torch.set_float32_matmul_precision("medium"),
}


@pytest.fixture
def clean_switches():
    before = {name: switch.fp32_precision for name, switch in SWITCHES.items()}
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    torch.set_float32_matmul_precision("highest")
    for name, switch in SWITCHES.items():
        switch.fp32_precision = before[name]


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("tf32", [False, True])
def test_float32_precision_sets_both_apis_inside_and_restores_a_callers_settings(clean_switches, caller, tf32):
    CALLERS[caller]()
    before = _everything()
    with float32_precision(tf32, cudnn=not tf32):
        assert tf32_settings() == (tf32, not tf32)
        assert torch.backends.cuda.matmul.allow_tf32 is tf32  # legacy readers (torch.compile's) see the choice
        assert torch.backends.cudnn.allow_tf32 is (not tf32)
    switches, *legacy = _everything()
    assert switches == before[0]
    assert [now for now, then in zip(legacy, before[1:]) if then != "raises"] == [
        then for then in before[1:] if then != "raises"
    ]


def test_tf32_settings_reads_a_switch_left_at_none_through_its_parents(clean_switches):
    assert tf32_settings() == (False, True)  # torch's defaults
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"
    assert tf32_settings() == (True, True)
    set_tf32(False, False)
    assert tf32_settings() == (False, False)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
