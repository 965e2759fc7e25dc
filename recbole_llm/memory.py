"""A run's resident memory close to what its tensors hold. glibc serves an allocation above its mmap threshold with
pages of its own that go back to the system when freed; below it, from the heap, whose freed holes stay resident.
The threshold starts at 128 KB but rises (to 32 MB) each time a larger block is freed, so after the first training
step every activation tensor of an LLM comes from the heap: a step's freed activations, and the holes between the
ones still alive, stay in the process's RSS. A fixed threshold stops that rise."""

import ctypes
import ctypes.util
import platform

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def fix_mmap_threshold(megabytes):
    """Serve allocations above `megabytes` MB from pages of their own, for the rest of the process, where the C
    library is glibc (Linux). Returns whether it was set."""
    if megabytes is None or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return libc.mallopt(M_MMAP_THRESHOLD, int(megabytes * 2**20)) == 1

