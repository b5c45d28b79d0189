"""How much memory a device has free right now: the one reading the loss's memory budget and stage 2's
checkpointing choice share (CUDA: the driver's ``mem_get_info``; CPU: the kernel's ``MemAvailable``)."""

from __future__ import annotations

import os

import torch


def available_ram_bytes() -> int:
    """RAM available to new allocations without swapping (``/proc/meminfo``'s MemAvailable, else the
    free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_and_total_bytes(device: torch.device) -> tuple[int, int]:
    """(bytes free now, bytes the device has). On the CPU both are the available RAM: what the process
    may still take is the whole of what it can plan with."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    free = available_ram_bytes()
    return free, free


def free_memory_bytes(device: torch.device) -> int:
    """What is free for new tensors on ``device`` right now (CUDA: the driver's count; CPU: RAM)."""
    return free_and_total_bytes(device)[0]


__all__ = ["available_ram_bytes", "free_and_total_bytes", "free_memory_bytes"]
