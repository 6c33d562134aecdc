"""Memory estimates made before a large allocation, so that a request too big for the machine gets
one line with the numbers instead of the kernel's out-of-memory killer.

The estimates are lower bounds of what the allocation needs (the data and its temporaries); they
are compared with the memory the kernel reports as available (``MemAvailable`` in
``/proc/meminfo``, else ``sysconf``). Where neither is known, nothing is refused.
"""

from __future__ import annotations

import os
from typing import Optional


class MemoryEstimateError(ValueError):
    """A request would need more memory than the machine has available."""


def available_bytes() -> Optional[int]:
    """Memory available to a new allocation in bytes, or ``None`` when the platform does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """``1.5e9 -> '1.5 GB'`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000.0
    return f"{n:.3g} PB"  # pragma: no cover


def check_fits(nbytes: float, what: str, available: Optional[int] = None) -> None:
    """Raise :class:`MemoryEstimateError` when ``nbytes`` exceed the available memory.

    Args:
        nbytes: the estimate (bytes).
        what: the request, named in the message (``"data_n=1000000000 (gmm)"``).
        available: override of :func:`available_bytes` (tests).
    """
    avail = available_bytes() if available is None else available
    if avail is not None and nbytes > avail:
        raise MemoryEstimateError(
            f"{what} needs about {format_bytes(nbytes)} of memory but {format_bytes(avail)} is available; ask for less"
        )


#: bytes per example of a 2-D toy while it is drawn: float64 draws and their temporaries (about
#: four (n, 2) float64 arrays live at once) plus the float32 result
TOY_BYTES_PER_EXAMPLE = 4 * 2 * 8 + 2 * 4


def check_dataset_fits(name: str, n: Optional[int], available: Optional[int] = None) -> None:
    """Refuse a dataset request whose examples cannot fit in memory.

    The toys draw ``n`` examples (:data:`TOY_BYTES_PER_EXAMPLE` each); image sets are read whole
    from their files and ``n`` only selects a subset, so only the toys are checked.
    """
    from .data import DATASETS

    if n is None or DATASETS.get(name) != "toy":
        return
    check_fits(float(n) * TOY_BYTES_PER_EXAMPLE, f"n={n} examples of {name!r}", available)


__all__ = ["MemoryEstimateError", "available_bytes", "check_fits", "check_dataset_fits", "format_bytes"]
