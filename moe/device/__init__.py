"""The machine a run uses: which device and autocast dtype (``placement.py``, read one way
everywhere) and the CPU allocator setting that spares large temporaries a page fault per 4 KiB
(``malloc.py``)."""

from moe.device.placement import autocast_context, autocast_dtype, resolve_device, set_threads

__all__ = ["autocast_context", "autocast_dtype", "resolve_device", "set_threads"]
