"""How the network runs on its device: bf16 where the hardware computes it natively, channels_last on request."""

from pathlib import Path
from typing import Callable, Union

import torch
from monai.utils import convert_to_tensor

CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # the Linux kernel's names for native bf16 (AVX512-BF16, AMX)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set:
    """The CPU's feature flags as the Linux kernel lists them; none where there is no such file (other systems)."""
    path = Path(cpuinfo)
    lines = path.read_text().splitlines() if path.is_file() else []
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def native_bf16(device: Union[str, torch.device]) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX. Elsewhere
    bf16 autocast is emulated and slower than fp32, so it stays off."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & CPU_BF16_FLAGS)


def place(network: torch.nn.Module, device: Union[str, torch.device], channels_last: bool) -> torch.nn.Module:
    """`network` on `device`, its weights channels_last if asked (faster convolutions on GPUs)."""
    return network.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def forward(
    inputs: torch.Tensor, network: Callable, autocast: torch.autocast, channels_last: bool
) -> Union[torch.Tensor, list]:
    """The network's output for `inputs` under `autocast` (bf16 or off), handed on as fp32 MetaTensors so that the
    losses and metrics compute in full precision; the inputs channels_last if asked, matching `place`."""
    if channels_last:
        inputs = inputs.to(memory_format=torch.channels_last)
    return convert_to_tensor(autocast(network)(inputs), dtype=torch.float32, track_meta=True)
