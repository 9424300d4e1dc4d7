"""A small decoder-only Transformer language model (GPT-style; Radford et al., 2018).

Token and learned position embeddings, pre-norm blocks of causal multi-head self-attention
and a GELU MLP, a final LayerNorm and a linear head over the vocabulary; scores the next
token at every position. Attention is written with explicit matrix products (no fused
kernels), so it runs under ``torch.func.vmap`` like every other model.
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import nn
from torch.nn import functional as F

from ..config import Ge
from ..registry import MODELS
from . import ModelContext


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)); causal attention with `heads` heads."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, t, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        split = lambda z: z.reshape(*lead, t, self.heads, width // self.heads).transpose(-3, -2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(width // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(-3, -2).reshape(*lead, t, width)
        x = x + self.proj(att)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerLM(nn.Module):
    """Embeddings, `layers` pre-norm blocks, final LayerNorm, vocabulary head."""

    def __init__(self, vocab: int, length: int, width: int, heads: int, layers: int, mlp: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[-1]
        h = self.tokens(tokens.long()) + self.positions[:t]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


@MODELS.register("transformer_lm")
def transformer_lm(
    ctx: ModelContext,
    width: Annotated[int, Ge(1)] = 128,
    heads: Annotated[int, Ge(1)] = 4,
    layers: Annotated[int, Ge(1)] = 2,
    mlp: Annotated[int, Ge(1)] = 512,
) -> nn.Module:
    """A small GPT-style causal Transformer for next-token language modelling (task 'lm').

    Inputs are token ids [T] (T at most the source's sequence length); the vocabulary is
    the source's number of classes.

    Args:
        width: Model (embedding) width; a multiple of `heads`.
        heads: Attention heads per block.
        layers: Transformer blocks.
        mlp: Hidden width of each block's MLP.
    """
    if ctx.task != "lm" or len(ctx.input_shape) != 1 or not ctx.num_classes:
        raise ValueError(f"transformer_lm needs a next-token language-modelling source (task 'lm', token "
                         f"sequences [T]); the data is task '{ctx.task}' with shape {list(ctx.input_shape)}")
    if width % heads:
        raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
    return TransformerLM(ctx.num_classes, ctx.input_shape[0], width, heads, layers, mlp)
