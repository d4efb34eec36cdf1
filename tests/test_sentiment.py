"""The sentiment reward: POSITIVE logits from a classifier, and the laptop classifier builder."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from rlhf_course.core import assets
from rlhf_course.policy import sentiment


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_classifier")
    tokenizer = assets.minilm_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                        label2id={"NEGATIVE": 0, "POSITIVE": 1})
    BertForSequenceClassification(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_reward_is_the_positive_logit(tiny_classifier):
    reward = sentiment.SentimentReward(tiny_classifier, batch_size=2)
    texts = ["a wonderful film", "a dreadful mess", "fine", ""]
    scores = reward(texts)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    model, tokenizer = reward.model, reward.tokenizer
    with torch.no_grad():
        expected = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 1]
    assert torch.allclose(scores, expected, atol=1e-5)
    assert torch.all((reward.probabilities(texts) > 0) & (reward.probabilities(texts) < 1))


def test_reward_rejects_a_single_string_and_unlabelled_models(tiny_classifier, tmp_path):
    reward = sentiment.SentimentReward(tiny_classifier)
    with pytest.raises(TypeError, match="list of texts"):
        reward("a wonderful film")
    model = BertForSequenceClassification.from_pretrained(str(tiny_classifier))
    model.config.id2label, model.config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    model.save_pretrained(str(tmp_path))
    reward.tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="POSITIVE"):
        sentiment.SentimentReward(tmp_path)


def test_labelled_snippets_hold_out_a_split():
    train_texts, train_labels, test_texts, test_labels = sentiment.labelled_snippets(seed=0, held_out=100)
    assert len(test_texts) == 100 and len(train_texts) == len(train_labels) > 12_000
    assert set(train_labels) == {0, 1}
    with pytest.raises(ValueError, match="held_out"):
        sentiment.labelled_snippets(held_out=10**6)


def test_train_classifier_one_step_saves_metrics(tmp_path):
    config = sentiment.ClassifierConfig(steps=1, batch_size=4, warmup_steps=1, held_out=16, max_length=16)
    metrics = sentiment.train_sentiment_classifier(tmp_path, config, progress=False)
    assert 0.0 <= metrics["held_out_accuracy"] <= 1.0 and metrics["held_out_examples"] == 16
    reward = sentiment.SentimentReward(tmp_path)
    assert reward(["great", "awful"]).shape == (2,)
