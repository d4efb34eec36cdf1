"""Notebook 09's comparison (``rl.compare_methods``, sweep "methods"): one budget for DPO, RLOO, GRPO and PPO,
on-policy DPO pairs, PPO's adapter with the adapter switched off as every reference, and the sweep's CSV.
Tiny random Llama models and a byte-level tokenizer with SmolLM2's conventions stand in for SmolLM2."""

import dataclasses
import math
import warnings

import pandas as pd
import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlhf_course import experiments
from rlhf_course.rl import compare_methods as cm
from rlhf_course.rl import lora_policy, sampling

REVIEWS = ["A wonderful film", "Dull and far too long", "The acting is superb", "I expected more from it",
           "Watching this was a joy", "An utterly forgettable plot", "Despite its length it works",
           "The story about a family", "This movie made me smile", "The film is a mess"]
N_EVAL = 4


def byte_tokenizer():
    """One token per byte (259 tokens), SmolLM2's specials: pad = eos = <|im_end|> = 2, and no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")


def tiny_llama(vocab_size=259):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=2)).eval()


class CountingReward:
    """The proxy reward's stand-in (texts -> the share of letters), counting every text it scores."""

    def __init__(self):
        self.scored = 0

    def __call__(self, texts):
        self.scored += len(texts)
        return torch.tensor([sum(c.isalpha() for c in text) / max(1, len(text)) for text in texts])


def length_judge(texts):
    return torch.tensor([len(text) / 100 for text in texts])


def tiny_recipe(profile=None):
    """PPO's laptop recipe cut to 2 steps of 8 completions (2 mini-batches of 4, 2 epochs), responses of 2-5 tokens."""
    return lora_policy.smollm2_ppo_config("laptop", steps=2, batch_size=8, mini_batch_size=4, ppo_epochs=2,
                                          forward_batch_size=8, response_min_tokens=2, response_max_tokens=6)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: with tiny models, threads only wait on each other (badly on a busy 2-core CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def queries(tokenizer, monkeypatch):
    """Training prompts (2-7 token openings of the reviews, several times over) and N_EVAL held-out ones."""
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in REVIEWS]
    train = [ids[:2 + i % 6] for i in range(4) for ids in encoded]
    held_out = [ids[:5] for ids in encoded[:N_EVAL]]
    monkeypatch.setattr(sampling, "train_and_eval_queries", lambda tokenizer, config, n_eval: (train, held_out[:n_eval]))
    return train


def test_every_method_gets_the_budget_of_the_ppo_recipe(tmp_path):
    config = lora_policy.ppo_start_config("laptop")
    budget = cm.MethodBudget.from_ppo(config)
    sampled = config.steps * config.batch_size  # 25 x 32 = 800 completions
    assert budget.completions == budget.rounds * budget.prompts_per_round * budget.group_size == 2 * budget.pairs == sampled
    assert budget.group_size == 4
    for method in ("dpo", "rloo", "grpo"):
        args = cm.trl_config(method, budget, tmp_path)
        assert args.learning_rate == config.learning_rate and args.beta == config.init_kl_coef
        assert args.lr_scheduler_type == config.lr_schedule and args.max_grad_norm == config.max_grad_norm
        assert args.seed == config.seed and not args.bf16 and not args.fp16
        if method == "dpo":  # one pass, pairs of mini-batches of PPO's size
            assert args.num_train_epochs == 1 and 2 * args.per_device_train_batch_size == config.mini_batch_size
            continue
        sequences_per_round = args.per_device_train_batch_size * args.steps_per_generation
        rounds = args.max_steps // (args.steps_per_generation * args.num_iterations)
        assert rounds * sequences_per_round == sampled and sequences_per_round == config.batch_size
        assert args.per_device_train_batch_size == config.mini_batch_size and args.num_iterations == config.ppo_epochs
        assert args.num_generations == 4 and args.max_completion_length == config.response_max_tokens - 1
        assert args.top_k == 0 and args.top_p == 1.0 and args.temperature == config.temperature


def test_dpo_pairs_are_the_policys_own_samples_ranked_by_the_proxy(tokenizer, queries, monkeypatch):
    sampled = []

    def recording_generate_batch(lm, batch, *args, **kwargs):
        out = real_generate_batch(lm, batch, *args, **kwargs)
        sampled.extend((tuple(q), tuple(ids[mask.bool()].tolist())) for q, ids, mask in zip(batch, out[2], out[3]))
        assert lm is policy
        return out

    real_generate_batch, policy = sampling.generate_batch, tiny_llama()
    monkeypatch.setattr(sampling, "generate_batch", recording_generate_batch)
    coarse = lambda texts: torch.tensor([float(len(text) % 3) for text in texts])  # noqa: E731 (ties are common)
    budget = cm.MethodBudget.from_ppo(tiny_recipe())
    pairs = cm.on_policy_pairs(policy, tokenizer, coarse, queries, budget, tiny_recipe())
    assert len(sampled) == 2 * budget.pairs == budget.completions  # every completion sampled, ties included
    assert 0 < len(pairs) < budget.pairs  # ties dropped
    for pair in pairs:
        for side in ("chosen", "rejected"):
            assert (tuple(pair["prompt_ids"]), tuple(pair[f"{side}_ids"])) in sampled
            text = tokenizer.decode(pair["prompt_ids"]) + tokenizer.decode(pair[f"{side}_ids"], skip_special_tokens=True)
            assert coarse([text]).item() == pair[f"{side}_score"]
        assert pair["chosen_score"] > pair["rejected_score"]


def test_trl_trains_ppos_adapter_and_takes_the_adapter_off_as_its_reference(tokenizer, tmp_path):
    budget = cm.MethodBudget.from_ppo(tiny_recipe())
    ppo_actor = lora_policy.add_lora_adapter(tiny_llama(), **lora_policy.PPO_LORA)
    ppo_adapter = {name: p for name, p in ppo_actor.named_parameters() if p.requires_grad}
    datasets = {"dpo": Dataset.from_list([{"prompt_ids": [40, 41], "chosen_ids": [42, 2], "rejected_ids": [43]}] * 4),
                "rloo": Dataset.from_dict({"prompt": REVIEWS}), "grpo": Dataset.from_dict({"prompt": REVIEWS})}
    for method, dataset in datasets.items():
        start = cm.MethodStart(tiny_llama(), tokenizer, CountingReward(), length_judge)
        trainer = cm.build_trainer(method, start, budget, dataset, tmp_path / method, progress=False)
        assert trainer.ref_model is None  # no second copy: TRL runs the reference with the adapter disabled
        adapter = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
        assert adapter.keys() == ppo_adapter.keys()
        assert all(torch.equal(adapter[name], ppo_adapter[name]) for name in adapter)  # same A, B = 0


def test_the_methods_sweep_runs_each_method_on_one_budget_into_a_resumable_csv(tokenizer, queries, tmp_path,
                                                                              monkeypatch, capsys):
    starts = []

    def tiny_start(profile, device):
        starts.append(cm.MethodStart(tiny_llama(), tokenizer, CountingReward(), length_judge))
        return starts[-1]

    monkeypatch.setattr(cm, "load_start", tiny_start)
    monkeypatch.setattr(lora_policy, "ppo_start_config", tiny_recipe)
    methods = experiments.SWEEPS["methods"]
    assert methods.csv == "09_beyond_ppo.csv" and list(methods.arms) == ["dpo", "rloo", "grpo", "ppo"]
    sweep = experiments.Sweep("methods", "methods.csv", methods.arms, eval_every=1, n_eval=N_EVAL, arm_column="method")
    path = tmp_path / "methods.csv"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        experiments.run_sweep(sweep, [0], path=path)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]  # TRL's read, silenced

    header = path.read_text().splitlines()[0].split(",")
    assert header == ["method" if c == "arm" else c for c in experiments.CSV_COLUMNS]
    frame = experiments.load_sweep(path)  # "method" read back as "arm"
    assert list(frame["arm"].unique()) == ["dpo", "rloo", "grpo", "ppo"]
    budget = cm.MethodBudget.from_ppo(tiny_recipe())
    expected = {*cm.HELDOUT_METRICS, "proxy_gain", "proxy_gain_se", "gold_gain", "gold_gain_se", *cm.COST_METRICS,
                experiments.DONE_METRIC}
    for method, start in zip(sweep.arms, starts):
        run = frame[frame["arm"] == method]
        held_out = run[~run["metric"].str.startswith("train_") | (run["metric"] == "train_seconds")]  # not PPO's log
        assert expected <= set(held_out["metric"]) and held_out["value"].map(math.isfinite).all(), method
        evaluations = run[run["metric"] == "proxy_reward"]
        assert evaluations["step"].tolist() == [0, 1, 2], method  # step = round of 8 sampled completions
        assert start.reward_fn.scored == budget.completions + len(evaluations) * N_EVAL, method  # 16 trained on
        kl = run[run["metric"] == "kl"].set_index("step")["value"]
        assert kl[0] == 0.0 and kl[2] != 0.0, method  # the reference is the start; the adapter moved
    at_start = frame[(frame["step"] == 0) & frame["metric"].isin(["proxy_reward", "gold_reward", "response_length"])]
    assert at_start.groupby("metric")["value"].nunique().eq(1).all()  # one start, one evaluation, for every method
    samples = experiments.load_samples(path)
    assert set(samples["arm"]) == set(sweep.arms) and set(samples["step"]) == {0, 2}
    trained = {"dpo": "train_dpo_accuracy", "rloo": "train_reward_mean", "grpo": "train_reward_mean",
               "ppo": "train_reward_mean"}  # TRL's own log, once per round, as PPO's
    for method, metric in trained.items():
        assert frame[(frame["arm"] == method) & (frame["metric"] == metric)]["step"].tolist() == [1, 2], method

    replayable = dataclasses.replace(sweep, eval_every=2)  # replay stops before the first evaluation after step 0
    table = experiments.replay(replayable, frame, "grpo", 0, steps=1, metrics=("train_reward_mean", "train_loss"))
    assert len(table) == 2 and (table["difference"].abs() < 1e-6).all()  # TRL's first round, reproduced
    with pytest.raises(ValueError, match="DPO samples all its pairs"):
        experiments.replay(replayable, frame, "dpo", 0, steps=1, metrics=("train_dpo_accuracy",))

    monkeypatch.setattr(cm, "load_start", lambda profile, device: pytest.fail("a finished run ran again"))
    experiments.run_sweep(sweep, [0], path=path)
    assert "grpo seed 0: in methods.csv already, skipped" in capsys.readouterr().out
    assert len(pd.read_csv(path)) == len(frame)
    with pytest.raises(ValueError, match="is not a sweep CSV"):
        experiments.finished_runs(path)  # read as an "arm" sweep
