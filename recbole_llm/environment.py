"""What a run's digits depend on beyond its code, settings, seed and data, written in its log and under its table:
floating-point sums come out in another order with another thread count or another set of CPU kernels (torch picks
AVX2 or AVX-512 code by what the CPU has), and a training run that starts from other last digits ends elsewhere."""

import platform

import torch


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_environment():
    """One line: torch's build, the CPU, the kernels torch chose for it, the threads, and the GPU if any."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"torch {torch.__version__} on {cpu_model()}, CPU kernels {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads{gpu}")


def cpu_computes_bf16():
    """Whether this CPU has bf16 matrix units (AMX or AVX512-BF16), where bf16 matrix products beat fp32's."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
