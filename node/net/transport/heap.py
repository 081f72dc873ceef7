"""glibc heap thresholds for megabyte buffers: process-wide by nature, so an explicit opt-in call.

Every transport layer allocates and frees megabyte-sized bytes objects. glibc serves those with
fresh mmaps (or trims the heap right after they are freed), so each one costs a page fault per
4 KiB. Raising the mmap and trim thresholds keeps that memory in the heap for reuse; the process
may then hold up to `trim_bytes` of free heap. Affects the whole process (every allocation), which
is why make_host calls it only when TransportConfig.tune_heap says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 * 1024 * 1024  # allocations below this come from the heap, not fresh mmaps
TRIM_THRESHOLD = 128 * 1024 * 1024  # free heap kept before returning memory to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>


def keep_large_buffers_in_heap(mmap_bytes: int = MMAP_THRESHOLD, trim_bytes: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds for this process; False where not glibc or refused (logged)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes) == 1 and ok
    if not ok:
        log.warning("mallopt refused the heap thresholds; large transport buffers will page-fault")
    return ok
