"""BERT's self-attention (Hugging Face's `BertSelfAttention` names), through PyTorch's SDPA.

The key mask is optional: a micro-batch without padding passes none, and SDPA may then take its
flash kernel on CUDA, which takes no mask at all (with one it falls back to the memory-efficient
kernel). The result is the same function either way: a mask that keeps every key changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bertpipe.model.dropout import Dropout

if TYPE_CHECKING:
    from bertpipe.model.bert import BertConfig


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = Dropout(config.attention_probs_dropout_prob)  # on the attention probabilities, as HF

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [B, T, H] -> [B, nh, T, hd]

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """`key_mask` [B, 1, 1, T] is True where the key is a real token; None: every key is."""
        query = self._split_heads(self.query(hidden_states))
        key = self._split_heads(self.key(hidden_states))
        value = self._split_heads(self.value(hidden_states))
        dropout = self.dropout.p if self.training else 0.0
        if dropout and hidden_states.device.type == "cpu":
            context = self._attend_with_cpu_dropout(query, key, value, key_mask)
        else:
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask, dropout_p=dropout)
        return context.transpose(1, 2).flatten(2)  # [B, nh, T, hd] -> [B, T, H]

    def _attend_with_cpu_dropout(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 key_mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA's math, written out so the probabilities take our cheap dropout: on the CPU, SDPA
        with dropout draws a Bernoulli tensor that costs more than the attention itself."""
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.head_dim**-0.5  # [B, nh, T, T]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        return torch.matmul(self.dropout(scores.softmax(dim=-1)), value)  # [B, nh, T, hd]
