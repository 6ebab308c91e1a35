"""Records, in order, a Triton launcher's device guard and its kernel launch (the device tests of both kernels)."""


def record_launches(monkeypatch, module, kernel_name):
    """Patch ``module.on_device`` and ``module.<kernel_name>`` so that entering and leaving the guard
    and each launch append ("enter", device), ("launch", None), ("exit", device) to the returned list;
    the kernel still runs."""
    events = []

    class RecordingGuard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc_info):
            events.append(("exit", self.device))

    real_kernel = getattr(module, kernel_name)

    class RecordingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                events.append(("launch", None))
                return real_kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, "on_device", RecordingGuard)
    monkeypatch.setattr(module, kernel_name, RecordingKernel())
    return events
