"""LEAF's Shakespeare character LSTM (Caldas et al., 2018; McMahan et al., 2017).

Characters are embedded in 8 dimensions and read by two stacked LSTM layers of 256 units; a
linear layer maps the last step's output to the next character's scores (LEAF's
models/shakespeare/stacked_lstm.py). For a next-token language-modelling source (task
'lm') it scores the next character at every step instead. The LSTM is written out (gate
matrices as Linear layers, PyTorch's gate order i, f, g, o), so that it runs under
``torch.func.vmap`` like every other model; the maths is ``nn.LSTM``'s.
"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from ..config import Ge
from ..registry import MODELS
from . import ModelContext


class LSTMLayer(nn.Module):
    """One LSTM layer over [B, T, in] inputs; returns the outputs [B, T, hidden]."""

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.ih = nn.Linear(inputs, 4 * hidden)
        self.hh = nn.Linear(hidden, 4 * hidden, bias=False)
        self.hidden = hidden
        bound = hidden ** -0.5  # nn.LSTM's initialisation: U(−1/√h, 1/√h) for every weight
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates_in = self.ih(x)  # every step's input projection at once
        h = x.new_zeros(*x.shape[:-2], self.hidden)
        c = torch.zeros_like(h)
        outputs = []
        for t in range(x.shape[-2]):
            i, f, g, o = (gates_in[..., t, :] + self.hh(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=-2)


class CharLSTM(nn.Module):
    """Embedding, stacked LSTM layers, linear scores over the vocabulary."""

    def __init__(self, vocab: int, embedding: int, hidden: int, layers: int, every_step: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.layers = nn.ModuleList(LSTMLayer(embedding if i == 0 else hidden, hidden) for i in range(layers))
        self.out = nn.Linear(hidden, vocab)
        self.every_step = every_step

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens.long())
        for layer in self.layers:
            h = layer(h)
        return self.out(h if self.every_step else h[..., -1, :])


@MODELS.register("char_lstm")
def char_lstm(
    ctx: ModelContext,
    embedding: Annotated[int, Ge(1)] = 8,
    hidden: Annotated[int, Ge(1)] = 256,
    layers: Annotated[int, Ge(1)] = 2,
) -> nn.Module:
    """LEAF's Shakespeare model: embedding 8, two LSTM layers of 256, next-character scores.

    Inputs are character ids [T]; the vocabulary is the source's number of classes (tokens
    for an 'lm' source, which gets scores at every step).

    Args:
        embedding: Embedding dimension.
        hidden: Units of each LSTM layer.
        layers: Stacked LSTM layers.
    """
    if len(ctx.input_shape) != 1 or not ctx.num_classes or ctx.task not in ("classification", "lm"):
        raise ValueError(f"char_lstm needs token sequences [T] with a classification or lm source "
                         f"(the data has shape {list(ctx.input_shape)}, task '{ctx.task}')")
    return CharLSTM(ctx.num_classes, embedding, hidden, layers, every_step=ctx.task == "lm")
