import math

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from rlhf_course.core import assets
from rlhf_course.reward import readout as ro

RIGHT = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
LEFT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def test_last_token_index_from_mask_handles_both_sides():
    assert ro.last_token_index_from_mask(RIGHT).tolist() == [2, 4]
    assert ro.last_token_index_from_mask(LEFT).tolist() == [4, 4]
    assert ro.last_token_index_right_padded(RIGHT).tolist() == [2, 4]
    assert ro.last_token_index_right_padded(LEFT).tolist() == [2, 4]  # the shortcut is wrong here
    with pytest.raises(ValueError, match="no real token"):
        ro.last_token_index_from_mask(torch.tensor([[0, 0]]))


def test_pad_equals_eos_trap():
    eos = 2
    # "hi <eos>" then padding with eos: the real eos is indistinguishable from padding
    ids = torch.tensor([[7, 8, eos, eos, eos], [5, eos, 6, 9, eos]])  # row 1: an eos mid-sequence (end of a turn)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert ro.last_token_index_from_mask(mask).tolist() == [2, 4]
    assert ro.last_non_pad_index_from_ids(ids, eos).tolist() == [1, 3]  # one token early in both rows
    assert ro.first_pad_index_from_ids(ids, eos).tolist() == [1, 0]  # row 1 stops at the first turn
    assert ro.attention_mask_from_ids(ids, eos).tolist() == [[1, 1, 0, 0, 0], [1, 0, 1, 1, 0]]
    assert ro.first_pad_index_from_ids(torch.tensor([[3, 4]]), eos).tolist() == [1]  # no pad: last position


def test_readouts_on_values():
    values = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 5.0]])
    assert ro.last_token_readout(values, RIGHT).tolist() == [3.0, 5.0]
    assert ro.colossalai_mean_readout(values).tolist() == pytest.approx([1.5, 1.0])  # padding + drops last
    assert ro.masked_mean_readout(values, RIGHT).tolist() == pytest.approx([2.0, 1.8])
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    assert ro.cls_pool(hidden).tolist() == hidden[:, 0].tolist()
    assert ro.mean_pool(hidden, RIGHT)[0].tolist() == pytest.approx(hidden[0, :3].mean(0).tolist())
    assert ro.gather_at(hidden, torch.tensor([1, 4])).tolist() == [hidden[0, 1].tolist(), hidden[1, 4].tolist()]
    with pytest.raises(ValueError, match="batch, seq_len"):
        ro.colossalai_mean_readout(torch.zeros(3))


def test_value_head_init_scale():
    head = ro.value_head(575, seed=0)
    assert head.weight.shape == (1, 575)
    assert head.weight.std().item() == pytest.approx(1 / 576, rel=0.1)
    assert torch.equal(ro.value_head(575, seed=0).weight, head.weight)


def _tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


def test_encode_causal_lm_left_and_right_padding_agree():
    tokenizer = assets.gpt2_tokenizer()
    model = _tiny_gpt2()
    texts = ["a good film", "a long and rather boring film about nothing"]
    right = ro.encode(model, tokenizer, texts, "right")
    left = ro.encode(model, tokenizer, texts, "left")
    assert right.hidden_states.shape[:2] == right.input_ids.shape
    torch.testing.assert_close(
        ro.last_token_readout(right.hidden_states, right.attention_mask),
        ro.last_token_readout(left.hidden_states, left.attention_mask),
        atol=1e-4,
        rtol=1e-4,
    )
    # ColossalAI's mean sees the padding, so the short text's score depends on the padding side
    head = ro.value_head(32, seed=0)
    values_right = head(right.hidden_states).squeeze(-1)
    values_left = head(left.hidden_states).squeeze(-1)
    assert not torch.allclose(ro.colossalai_mean_readout(values_right)[0], ro.colossalai_mean_readout(values_left)[0])
    torch.testing.assert_close(
        ro.masked_mean_readout(values_right, right.attention_mask),
        ro.masked_mean_readout(values_left, left.attention_mask),
        atol=1e-4,
        rtol=1e-4,
    )
    trapped = ro.encode(model, tokenizer, [texts[0] + tokenizer.eos_token], "right", attention_mask_from_pad_id=True)
    assert trapped.attention_mask[0, -1].item() == 0  # the real eos was masked out
    with pytest.raises(ValueError, match="padding_side"):
        ro.encode(model, tokenizer, texts, "middle")


def test_encode_encoder_pooling():
    tokenizer = assets.minilm_tokenizer()
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)).eval()
    out = ro.encode(model, tokenizer, ["great", "not great at all"], "right")
    assert out.input_ids[0, 0].item() == tokenizer.cls_token_id
    assert ro.cls_pool(out.hidden_states).shape == (2, 32)
    assert ro.mean_pool(out.hidden_states, out.attention_mask).shape == (2, 32)


def test_linear_probe_recovers_a_linear_target():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 5, generator=generator)
    weight = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0])
    targets = features @ weight + 0.01 * torch.randn(200, generator=generator)
    predictions, alpha = ro.linear_probe(features[:150], targets[:150], features[150:])
    assert ro.pearson(predictions, targets[150:]) > 0.99
    assert alpha in (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
    with pytest.raises(ValueError, match="targets"):
        ro.linear_probe(features, targets[:3], features)


def test_correlations():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert ro.pearson(a, 2 * a) == pytest.approx(1.0)
    assert ro.spearman(a, a**3) == pytest.approx(1.0)
    assert ro.spearman(a, -a) == pytest.approx(-1.0)
    assert math.isnan(ro.pearson(a, torch.ones(4)))
