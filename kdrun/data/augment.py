"""What train-time augmentation a dataset source applies, declared on :class:`kdrun.data.Splits`.

The declaration serves two readers: device-resident data (:mod:`kdrun.data.device`)
repeats the augmentation on whole batches on the device, and the teacher-output
cache knows that augmented inputs change every epoch (so the teacher's outputs do too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Augmentation:
    """Random crop with zero padding (``crop_padding`` pixels; ``fill`` is a padded pixel's value
    per channel after normalisation) and horizontal flip for images; circular shift by up to
    ``max_shift`` plus Gaussian ``noise`` for signals. ``on_device=False`` marks an augmentation
    that only the per-sample transform can do (e.g. ImageFolder's RandomResizedCrop)."""

    crop_padding: int = 0
    flip: bool = False
    fill: tuple[float, ...] = (0.0,)
    max_shift: int = 0
    noise: float = 0.0
    on_device: bool = True

    def __call__(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The augmentation of a batch ``(B, C, H, W)`` or ``(B, C, L)``, each sample drawn independently."""
        if self.crop_padding:
            inputs = random_crop(inputs, self.crop_padding, self.fill, generator)
        if self.flip:
            flipped = torch.rand(inputs.shape[0], device=inputs.device, generator=generator) < 0.5
            inputs = torch.where(flipped.view(-1, *[1] * (inputs.dim() - 1)), inputs.flip(-1), inputs)
        if self.max_shift:
            inputs = random_roll(inputs, self.max_shift, generator)
        if self.noise:
            noise = torch.randn(inputs.shape, device=inputs.device, generator=generator, dtype=inputs.dtype)
            inputs = inputs + self.noise * noise
        return inputs


def random_crop(images: torch.Tensor, padding: int, fill: tuple[float, ...], generator: torch.Generator) -> torch.Tensor:
    """torchvision's ``RandomCrop(size, padding)`` for a whole batch: pad with ``fill``, cut a
    same-size window at a random offset per image."""
    batch, channels, height, width = images.shape
    padded = images.new_empty((batch, channels, height + 2 * padding, width + 2 * padding))
    for channel, value in enumerate(fill if len(fill) == channels else fill * channels):
        padded[:, channel].fill_(value)  # a scalar fill: no host-to-device copy, so no sync on CUDA
    padded[:, :, padding:padding + height, padding:padding + width] = images
    dy = torch.randint(0, 2 * padding + 1, (batch, 1), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch, 1), device=images.device, generator=generator)
    rows = (dy + torch.arange(height, device=images.device)).view(batch, 1, height, 1)
    cols = (dx + torch.arange(width, device=images.device)).view(batch, 1, 1, width)
    samples = torch.arange(batch, device=images.device).view(batch, 1, 1, 1)
    return padded[samples, torch.arange(channels, device=images.device).view(1, channels, 1, 1), rows, cols]


def random_roll(signals: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """``torch.roll`` along the last axis by a random shift in [-max_shift, max_shift] per sample."""
    length = signals.shape[-1]
    shifts = torch.randint(-max_shift, max_shift + 1, (signals.shape[0], 1), device=signals.device, generator=generator)
    source = (torch.arange(length, device=signals.device) - shifts) % length
    return torch.gather(signals, -1, source.view(signals.shape[0], *[1] * (signals.dim() - 2), length).expand_as(signals))
