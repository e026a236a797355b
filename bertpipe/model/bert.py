"""The original BERT (post-LN) for MLM + NSP pretraining.

The module tree and attribute names copy Hugging Face's `models/bert/modeling_bert.py`, so
`BertForPreTraining.state_dict()` has exactly the keys (and shapes) of `transformers.BertForPreTraining`:
16 per layer plus 16, tied `cls.predictions.decoder.{weight,bias}` included. The size and style
follow nanoGPT's `model.py`: one forward path, no caches, no cross-attention, no task heads.
Two things differ from HF on purpose: padding comes in as `valid_lens` (real tokens per row)
rather than an attention mask, and the MLM head runs only on the masked positions (cramming's
sparse prediction), never on every position times the vocabulary. Losses live in `bertpipe.training.loop`.

Self-attention goes through PyTorch's SDPA, and its key mask is optional: a micro-batch without
padding passes none, and SDPA may then take its flash kernel on CUDA, which takes no mask at all
(with one it falls back to the memory-efficient kernel). The result is the same function either
way: a mask that keeps every key changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bertpipe.model.dropout import Dropout
from bertpipe.vocab import PAD_ID


@dataclass(frozen=True)
class BertConfig:
    """Model hyperparameters under HF `BertConfig` names, so `transformers.BertConfig(**asdict(cfg))` works.

    The defaults are HF's (BERT-base) except `pad_token_id`, which follows our vocabulary.
    """

    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = PAD_ID

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act != "gelu":  # the field exists for HF; the model only has exact GELU
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; only 'gelu' (erf)")

    @classmethod
    def from_params(cls, model: Any, vocab_size: int) -> BertConfig:
        """params.yaml's `model` section (`bertpipe.config.ModelConfig`, whose `architecture()` uses this
        class's names) plus the vocabulary size."""
        return cls(vocab_size=vocab_size, **model.architecture())


class PreTrainingOutput(NamedTuple):
    sequence_output: torch.Tensor  # [B, T, H] last encoder layer
    pooled_output: torch.Tensor | None  # [B, H] tanh(dense(<cls> state)); None without the NSP head
    mlm_logits: torch.Tensor | None  # [N, V] at the N masked positions, None when none were asked for
    nsp_logits: torch.Tensor | None  # [B, 2], class 0 = "is next"; None without the NSP head


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        # Positions come from arange rather than a buffer, so nothing extra lands in the state_dict.
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T], broadcast over B
        embeddings = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
                      + self.position_embeddings(position_ids))  # [B, T, H]
        return self.dropout(self.LayerNorm(embeddings))


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


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        # Post-LN, as in the original BERT: normalize after the residual sum.
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden_states, key_mask), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden_states))  # exact (erf) GELU, HF's "gelu"


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        attention_output = self.attention(hidden_states, key_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False  # HF's name: keep only layer inputs, recompute the rest in backward

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                hidden_states = checkpoint(layer, hidden_states, key_mask, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, key_mask)
        return hidden_states


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))  # the <cls> token: [B, T, H] -> [B, H]


class BertModel(nn.Module):
    """The encoder: embeddings, `num_hidden_layers` post-LN blocks and the pooler (HF's `add_pooling_layer`:
    only the NSP head reads it)."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(partial(_init_weights, std=config.initializer_range))

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, valid_lens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids and segment ids [B, T], real tokens per row [B] -> ([B, T, H], [B, H] or None).

        Every row needs valid_lens >= 1: a row with no real key would softmax over nothing.
        valid_lens None means no padding (every row has T real tokens): attention then takes no mask.
        """
        key_mask = None
        if valid_lens is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]
            key_mask = positions[None, :] < valid_lens[:, None]  # [B, T], True for real tokens
            key_mask = key_mask[:, None, None, :]  # [B, T] -> [B, 1, 1, T], broadcast over heads and queries
        sequence_output = self.encoder(self.embeddings(input_ids, token_type_ids), key_mask)
        return sequence_output, None if self.pooler is None else self.pooler(sequence_output)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # decoder.weight is tied to the word embeddings by BertForPreTraining; the output-only bias
        # is `bias`, shared with decoder.bias so both HF key names exist, as in HF.
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))  # [N, H] -> [N, V]


class BertPreTrainingHeads(nn.Module):
    """HF's `BertPreTrainingHeads`, or with `next_sentence=False` its `BertOnlyMLMHead` (same `predictions`)."""

    def __init__(self, config: BertConfig, next_sentence: bool = True) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2) if next_sentence else None

    def forward(
        self, sequence_output: torch.Tensor, pooled_output: torch.Tensor | None, masked_positions: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """MLM logits [N, V] at the flat `masked_positions` [N] (or None), NSP logits [B, 2] (or None)."""
        mlm_logits = None
        if masked_positions is not None:
            masked = sequence_output.flatten(0, 1)[masked_positions]  # [B, T, H] -> [B*T, H] -> [N, H]
            mlm_logits = self.predictions(masked)
        nsp_logits = None if self.seq_relationship is None else self.seq_relationship(pooled_output)
        return mlm_logits, nsp_logits


class BertForPreTraining(nn.Module):
    """BERT with the masked-LM and next-sentence heads; state_dict keys equal HF's `BertForPreTraining`.

    With `next_sentence=False` (`train.objective: mlm`) there is no NSP head and no pooler, and the keys
    equal HF's `BertForMaskedLM`: nothing is trained that the objective does not use (DDP also requires
    every parameter to take part in the loss).
    """

    def __init__(self, config: BertConfig, next_sentence: bool = True) -> None:
        super().__init__()
        self.config, self.next_sentence = config, next_sentence
        self.bert = BertModel(config, add_pooling_layer=next_sentence)
        self.cls = BertPreTrainingHeads(config, next_sentence)
        self.cls.apply(partial(_init_weights, std=config.initializer_range))
        # Tie after init so that the embedding keeps its zeroed <pad> row.
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        valid_lens: torch.Tensor | None,
        masked_positions: torch.Tensor | None = None,
    ) -> PreTrainingOutput:
        """Args:
        input_ids: [B, T] token ids, padded with <pad> after `valid_lens`.
        token_type_ids: [B, T] segment ids, 0 for sentence A and 1 for sentence B.
        valid_lens: [B] number of real tokens per row (at least 1), or None when no row has padding.
        masked_positions: [N] flat indices into the B*T positions (row * T + column) of the
            real predicted tokens only; the caller drops padded prediction slots.
        """
        sequence_output, pooled_output = self.bert(input_ids, token_type_ids, valid_lens)
        mlm_logits, nsp_logits = self.cls(sequence_output, pooled_output, masked_positions)
        return PreTrainingOutput(sequence_output, pooled_output, mlm_logits, nsp_logits)


def _init_weights(module: nn.Module, std: float) -> None:
    """HF BERT's init: normal(0, std) weights, zero biases, unit LayerNorm, zeroed padding row."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        nn.init.zeros_(module.bias)  # for the decoder this is BertLMPredictionHead.bias
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
