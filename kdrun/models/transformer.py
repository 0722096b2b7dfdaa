"""A small pre-norm transformer classifier (ViT-style) for signals and images.

``stem`` cuts the input into non-overlapping patches (``patch`` samples of a
(C, L) signal, ``patch`` x ``patch`` pixels of a (C, H, W) image), embeds each
as a token and adds learned position embeddings. ``stage1..stageN`` are
transformer blocks whose outputs are the hidden states (B, T, dim) that
TinyBERT/DistilBERT-style terms read; each block's softmax attention passes
through ``stageK.attn.probs`` (B, heads, T, T) so a hook can read it too.
``embedding`` = final LayerNorm + mean over tokens, ``fc`` = classifier.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

from kdrun.errors import ConfigError


class PatchTokens(nn.Module):
    """Non-overlapping patches -> linear embedding (a conv with kernel = stride = patch) + positions."""

    def __init__(self, input_shape: Sequence[int], dim: int, patch: int):
        super().__init__()
        channels, *size = input_shape
        conv = nn.Conv1d if len(size) == 1 else nn.Conv2d
        self.embed = conv(channels, dim, kernel_size=patch, stride=patch)
        num_tokens = math.prod(side // patch for side in size)
        self.position = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x).flatten(2).transpose(1, 2) + self.position


class SelfAttention(nn.Module):
    """Multi-head self-attention written out (no fused kernel), so the probabilities are a module output."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.probs = nn.Identity()  # the tap point for attention-transfer terms
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads)
        probs = self.probs(scores.softmax(dim=-1))
        mixed = self.dropout(probs) @ v
        return self.out(mixed.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then + MLP(LN(x)); its output is the hidden state."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Out of place: a hook may hold this block's input (the previous stage's output).
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def transformer(
    num_classes: int,
    input_shape: Sequence[int],
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    patch: int = 4,
    mlp_ratio: float = 2,
    dropout: float = 0.0,
) -> nn.Module:
    if len(input_shape) not in (2, 3):
        raise ConfigError(f"transformer expects (C, L) or (C, H, W) inputs, got shape {tuple(input_shape)}")
    if any(side % patch for side in input_shape[1:]):
        raise ConfigError(f"transformer: patch={patch} must divide the input size {tuple(input_shape[1:])}")
    if dim % heads:
        raise ConfigError(f"transformer: dim={dim} must be divisible by heads={heads}")
    layers: dict[str, nn.Module] = {"stem": PatchTokens(input_shape, dim, patch)}
    for i in range(1, depth + 1):
        layers[f"stage{i}"] = Block(dim, heads, mlp_ratio, dropout)
    layers["embedding"] = nn.Sequential(nn.LayerNorm(dim), TokenMean())
    layers["fc"] = nn.Linear(dim, num_classes)
    return nn.Sequential(OrderedDict(layers))
