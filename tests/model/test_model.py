"""Contract and parity tests for bertpipe/model/bert.py on the tiny "debugmodel" size (CPU, a few seconds)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bertpipe.config import ModelConfig
from bertpipe.model.bert import BertConfig, BertForPreTraining, BertModel, BertSelfAttention

VOCAB = 100
ANCHOR_KEYS = (
    "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight",
    "bert.embeddings.LayerNorm.weight",
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.0.attention.output.LayerNorm.weight",
    "bert.encoder.layer.0.intermediate.dense.weight",
    "bert.encoder.layer.1.output.LayerNorm.bias",
    "bert.pooler.dense.weight",
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.predictions.bias",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
    "cls.seq_relationship.weight",
)


def debug_config(**overrides) -> BertConfig:
    """The d2l size: 2 layers, hidden 128, 2 heads, FFN 256 (dropout 0.2 from the preset)."""
    return dataclasses.replace(BertConfig.from_params(ModelConfig(preset="tiny"), vocab_size=VOCAB), **overrides)


def make_model(config: BertConfig, seed: int = 0) -> BertForPreTraining:
    torch.manual_seed(seed)
    return BertForPreTraining(config)


def make_batch(seed: int = 0, batch: int = 3, seq: int = 12):
    """A padded batch: <cls> first, <pad> (id 1) after valid_lens, segment B in the second half."""
    gen = torch.Generator().manual_seed(seed)
    valid_lens = torch.tensor([seq, 7, 4][:batch])
    real = torch.arange(seq)[None, :] < valid_lens[:, None]  # [B, T]
    input_ids = torch.randint(5, VOCAB, (batch, seq), generator=gen)
    input_ids[:, 0] = 3
    input_ids[~real] = 1
    token_type_ids = ((torch.arange(seq)[None, :] >= valid_lens[:, None] // 2) & real).long()
    masked_positions = torch.tensor([1, 5, 11, seq + 2, seq + 6, 2 * seq + 3])  # real positions only
    return input_ids, token_type_ids, valid_lens, masked_positions


def test_state_dict_keys_contract():
    for layers in (1, 2, 3):
        keys = make_model(debug_config(num_hidden_layers=layers)).state_dict().keys()
        assert len(keys) == 16 * layers + 16
    keys = make_model(debug_config()).state_dict().keys()
    assert set(ANCHOR_KEYS) <= set(keys)
    assert not any("position_ids" in k for k in keys)


def test_state_dict_matches_transformers():
    transformers = pytest.importorskip("transformers")
    config = debug_config()
    ours = make_model(config).state_dict()
    theirs = transformers.BertForPreTraining(transformers.BertConfig(**dataclasses.asdict(config))).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_decoder_is_tied_and_init_follows_hf():
    model = make_model(debug_config())
    embeddings = model.bert.embeddings.word_embeddings
    assert model.cls.predictions.decoder.weight is embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    assert torch.all(embeddings.weight[model.config.pad_token_id] == 0)
    assert torch.all(model.cls.predictions.bias == 0)
    assert embeddings.weight.std().item() == pytest.approx(model.config.initializer_range, rel=0.1)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_parity_with_transformers(attn_implementation, dropout):
    transformers = pytest.importorskip("transformers")
    config = debug_config(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    ours = make_model(config).eval()
    hf_config = transformers.BertConfig(**dataclasses.asdict(config), attn_implementation=attn_implementation)
    theirs = transformers.BertForPreTraining(hf_config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    input_ids, token_type_ids, valid_lens, masked_positions = make_batch()
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < valid_lens[:, None]).long()  # [B, T]

    with torch.no_grad():
        out = ours(input_ids, token_type_ids, valid_lens, masked_positions)
        hf_out = theirs(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                        output_hidden_states=True)
        hf_pooled = theirs.bert(input_ids=input_ids, token_type_ids=token_type_ids,
                                attention_mask=attention_mask).pooler_output
    real = attention_mask.bool()
    hf_mlm = hf_out.prediction_logits.flatten(0, 1)[masked_positions]  # [B, T, V] -> [N, V]
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sequence_output[real], hf_out.hidden_states[-1][real], **close)
    torch.testing.assert_close(out.pooled_output, hf_pooled, **close)
    torch.testing.assert_close(out.nsp_logits, hf_out.seq_relationship_logits, **close)
    torch.testing.assert_close(out.mlm_logits, hf_mlm, **close)


def test_sparse_mlm_head_equals_dense():
    model = make_model(debug_config()).eval()
    input_ids, token_type_ids, valid_lens, masked_positions = make_batch()
    batch, seq = input_ids.shape
    with torch.no_grad():
        every = model(input_ids, token_type_ids, valid_lens, torch.arange(batch * seq))
        dense = model.cls.predictions(every.sequence_output)  # [B, T, V]
        sparse = model(input_ids, token_type_ids, valid_lens, masked_positions)
    assert sparse.mlm_logits.shape == (len(masked_positions), VOCAB)
    torch.testing.assert_close(sparse.mlm_logits, dense.flatten(0, 1)[masked_positions], atol=1e-6, rtol=0)
    torch.testing.assert_close(every.mlm_logits, dense.flatten(0, 1), atol=1e-6, rtol=0)
    assert model(input_ids, token_type_ids, valid_lens).mlm_logits is None


def test_padding_does_not_leak():
    model = make_model(debug_config()).eval()
    input_ids, token_type_ids, valid_lens, masked_positions = make_batch()
    real = torch.arange(input_ids.shape[1])[None, :] < valid_lens[:, None]  # [B, T]
    noisy_ids = torch.where(real, input_ids, torch.randint(5, VOCAB, input_ids.shape))
    noisy_types = torch.where(real, token_type_ids, torch.ones_like(token_type_ids))
    with torch.no_grad():
        clean = model(input_ids, token_type_ids, valid_lens, masked_positions)
        noisy = model(noisy_ids, noisy_types, valid_lens, masked_positions)
    close = dict(atol=1e-6, rtol=0)
    torch.testing.assert_close(noisy.sequence_output[real], clean.sequence_output[real], **close)
    torch.testing.assert_close(noisy.nsp_logits, clean.nsp_logits, **close)
    torch.testing.assert_close(noisy.mlm_logits, clean.mlm_logits, **close)


def test_eval_is_deterministic_and_train_uses_dropout():
    model = make_model(debug_config())
    batch = make_batch()
    with torch.no_grad():
        model.eval()
        first, second = model(*batch), model(*batch)
        model.train()
        third, fourth = model(*batch), model(*batch)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(third.sequence_output, fourth.sequence_output)


def test_gradients_reach_every_parameter():
    model = make_model(debug_config())
    out = model(*make_batch())
    (out.mlm_logits.sum() + out.nsp_logits.sum()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


@pytest.mark.parametrize(("preset", "expected"), [
    ("base", 110_106_428),  # the published BERT-base (HF bert-base-uncased, pretraining heads)
    ("large", 336_226_108),
])
def test_preset_parameter_counts(preset, expected):
    config = BertConfig.from_params(ModelConfig(preset=preset), vocab_size=30522)
    with torch.device("meta"):
        model = BertForPreTraining(config)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_base_preset_forward_shapes():
    config = BertConfig.from_params(ModelConfig(preset="base", num_hidden_layers=2), vocab_size=VOCAB)
    model = make_model(config)
    input_ids, token_type_ids, valid_lens, masked_positions = make_batch(batch=2, seq=8)
    masked_positions = torch.tensor([1, 9])
    with torch.no_grad():
        out = model(input_ids, token_type_ids, valid_lens, masked_positions)
        sequence_output, pooled_output = BertModel(config)(input_ids, token_type_ids, valid_lens)
    assert out.sequence_output.shape == sequence_output.shape == (2, 8, 768)
    assert out.pooled_output.shape == pooled_output.shape == (2, 768)
    assert out.mlm_logits.shape == (2, VOCAB)
    assert out.nsp_logits.shape == (2, 2)


def test_config_round_trips_through_transformers():
    transformers = pytest.importorskip("transformers")
    config = debug_config()
    hf_config = transformers.BertConfig(**dataclasses.asdict(config))
    assert BertConfig(**{f.name: getattr(hf_config, f.name) for f in dataclasses.fields(BertConfig)}) == config
    with pytest.raises(ValueError, match="multiple"):
        dataclasses.replace(config, num_attention_heads=3)


def test_cpu_dropout_keeps_the_expectation_and_drops_a_rounded_p() -> None:
    """p is rounded to a multiple of 1/256 and kept values scaled by the exact inverse keep rate."""
    from bertpipe.model.dropout import Dropout

    torch.manual_seed(0)
    dropout = Dropout(0.2).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - 51 / 256)) < 3e-3  # 1e6 draws: sampling error ~4e-4
    assert torch.equal(y[kept], torch.full_like(y[kept], 256 / 205))
    assert abs(y.mean().item() - 1.0) < 3e-3
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient flows through the same mask
    assert torch.equal(Dropout(0.2).eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)


def test_attention_written_out_for_cpu_dropout_equals_sdpa() -> None:
    """The written-out attention (taken on the CPU when attention dropout is on) is SDPA's math."""
    torch.manual_seed(0)
    attention = BertSelfAttention(debug_config(attention_probs_dropout_prob=0.0))
    query, key, value = (torch.randn(3, 2, 7, 64) for _ in range(3))
    key_mask = (torch.arange(7)[None, :] < torch.tensor([7, 4, 1])[:, None])[:, None, None, :]
    written = attention._attend_with_cpu_dropout(query, key, value, key_mask)
    fused = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)
    torch.testing.assert_close(written, fused, rtol=1e-5, atol=1e-6)


def test_three_training_steps_match_transformers():
    """The same weights, batches, loss (MLM over the masked positions + NSP) and Adam: the same losses and
    weights after three steps as transformers' BertForPreTraining (fp32, dropout off)."""
    transformers = pytest.importorskip("transformers")
    config = debug_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours = make_model(config)
    theirs = transformers.BertForPreTraining(transformers.BertConfig(**dataclasses.asdict(config)))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (ours, theirs)]
    for step in range(3):
        input_ids, token_type_ids, valid_lens, masked_positions = make_batch(seed=step)
        generator = torch.Generator().manual_seed(100 + step)
        mlm_labels = torch.randint(5, VOCAB, (len(masked_positions),), generator=generator)
        nsp_labels = torch.randint(0, 2, (len(valid_lens),), generator=generator)
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < valid_lens[:, None]).long()
        out = ours(input_ids, token_type_ids, valid_lens, masked_positions)
        hf = theirs(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        losses = [F.cross_entropy(mlm, mlm_labels) + F.cross_entropy(nsp, nsp_labels) for mlm, nsp in (
            (out.mlm_logits, out.nsp_logits),
            (hf.prediction_logits.flatten(0, 1)[masked_positions], hf.seq_relationship_logits))]
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-5)
        for loss, optimizer in zip(losses, optimizers, strict=True):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    theirs_state = theirs.state_dict()
    for name, weight in ours.state_dict().items():
        torch.testing.assert_close(weight, theirs_state[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("training", [False, True])
def test_no_key_mask_is_the_full_mask(training: bool) -> None:
    """valid_lens None (no row padded: attention takes no mask, SDPA's flash kernel on CUDA) computes what
    a mask keeping every key computes, with dropout too (the same draws in the same order)."""
    model = make_model(debug_config()).train(training)
    input_ids, token_type_ids, _, masked_positions = make_batch()
    full = torch.full((len(input_ids),), input_ids.shape[1])
    outputs = []
    for valid_lens in (full, None):
        torch.manual_seed(1)
        outputs.append(model(input_ids, token_type_ids, valid_lens, masked_positions))
    for masked, unmasked in zip(*outputs, strict=True):
        torch.testing.assert_close(unmasked, masked, rtol=1e-6, atol=1e-6)
