"""The fixed mmap threshold (mmap_threshold_mb): freed activations leave the process's resident memory."""

import platform
import subprocess
import sys

from recbole_llm.memory import fix_mmap_threshold

# A training step's pattern: each layer leaves a 4 MB activation, freed when the step ends, and a small tensor that
# outlives the step (a gradient, a logged value) between them; the resident memory the steps leave behind, in MB.
STEPS = """
import sys, torch
from recbole_llm.memory import fix_mmap_threshold
def resident(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
if sys.argv[1] != 'None': assert fix_mmap_threshold(float(sys.argv[1]))
kept, start = [], resident()
for step in range(3):
    activations = []
    for layer in range(50):
        activations.append(torch.ones(2**20))
        kept.append(torch.ones(2**15))
    del activations
print(round(resident() - start))
"""


def resident_after_steps(threshold_mb):
    output = subprocess.run([sys.executable, "-c", STEPS, str(threshold_mb)], capture_output=True, text=True, check=True)
    return int(output.stdout)


def test_freed_activations_leave_resident_memory_with_a_fixed_threshold_only():
    if platform.libc_ver()[0] != "glibc":  # the threshold is glibc's: another C library is left as it is
        assert fix_mmap_threshold(1) is False
        return
    kept = 3 * 50 * 2**15 * 4 / 2**20  # the small tensors that stay alive: 19 MB
    assert resident_after_steps(None) > kept + 100  # glibc's rising threshold: the freed 4 MB blocks stay resident
    assert resident_after_steps(1) < kept + 10


def test_no_threshold_leaves_the_c_library_alone():
    assert fix_mmap_threshold(None) is False
