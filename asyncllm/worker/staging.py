"""A step's host-built index tensors (token ids, positions, KV slots, lengths, block tables) to the
GPU in one copy from pinned memory.

Each `tensor.to("cuda")` of ordinary (pageable) host memory is a copy the host waits for, and a
step used to make five or six of them. Here they are packed into one pinned int64 buffer, copied
with non_blocking=True (the host goes on building the step while the DMA runs, in stream order
before the step's kernels), and handed out as views of the device copy. The buffer is reused
across steps, so before writing it again the host waits for the event recorded after the last
copy (by then long done: the step's sampled tokens were read back in between).

On the CPU the tensors are already where they run and come back as they are; `pack=True` runs the
packing there too, which is how the tests check it.
"""
from __future__ import annotations

import torch


class HostToDeviceStaging:
    def __init__(self, device: torch.device, pack: bool | None = None):
        self.device = device
        self.pack = device.type != "cpu" if pack is None else pack
        self.pinned = device.type == "cuda"
        self._host = torch.empty(0, dtype=torch.long)
        self._copied = torch.cuda.Event() if self.pinned else None
        self.copies = 0  # device copies made (one per call that packs)

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Integer tensors on the host → the same values on the device (int64, same shapes)."""
        if not self.pack:
            return [t.to(self.device) for t in tensors]
        sizes = [t.numel() for t in tensors]
        total = sum(sizes)
        if self._copied is not None:
            self._copied.synchronize()  # the last copy has read the buffer
        if self._host.numel() < total:
            self._host = torch.empty(max(total, 2 * self._host.numel()), dtype=torch.long, pin_memory=self.pinned)
        host = self._host[:total]
        torch.cat([t.reshape(-1).to(torch.long) for t in tensors], out=host)
        if self.pinned:
            flat = host.to(self.device, non_blocking=True)
            self._copied.record()
        else:
            flat = host.clone().to(self.device)  # the next call overwrites the buffer
        self.copies += 1
        return [part.view(t.shape) for part, t in zip(flat.split(sizes), tensors)]
