"""The sweep runner: resumable long CSV, per-arm intervals, and the separate critic it compares."""

import copy

import pandas as pd
import pytest
import torch

from rlhf_course import experiments
from rlhf_course.core.stats import student_t_cdf, student_t_quantile, welch_df
from rlhf_course.rl import lora_policy, ppo

from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=2)).eval()


def fake_rows(sweep, arm, seed, profile, device, samples=None):
    if samples is not None:
        samples.extend({"step": step, "query": "What a", "response": response, "proxy": 0.5, "gold": 0.1, "kl": kl,
                        "length": 2} for step, response, kl in [(0, "NA", float("nan")), (5, "", 1.5)])
    return [{"step": 0, "metric": "proxy_reward", "value": 0.1},
            {"step": 5, "metric": "proxy_reward", "value": 1.0 + seed + (arm == "b")}]


@pytest.fixture
def sweep(monkeypatch):
    monkeypatch.setattr(experiments, "run_rows", fake_rows)
    return experiments.Sweep("toy", "toy.csv", {"a": {}, "b": {"learning_rate": 1e-4}})


def test_a_sweep_resumes_skipping_finished_runs_and_extends_to_new_seeds(sweep, tmp_path, capsys):
    path = tmp_path / "toy.csv"
    experiments.run_sweep(sweep, [0], path=path)
    first = pd.read_csv(path)
    assert list(first.columns) == list(experiments.CSV_COLUMNS)
    assert set(first["arm"]) == {"a", "b"} and (first["metric"] == experiments.DONE_METRIC).sum() == 2
    experiments.run_sweep(sweep, [0, 1], path=path)
    assert "a seed 0: in toy.csv already, skipped" in capsys.readouterr().out
    second = pd.read_csv(path)
    assert len(second) == 2 * len(first) and sorted(second["seed"].unique()) == [0, 1]  # seed 0 not run twice


def test_an_interrupted_run_leaves_no_rows_and_runs_again(sweep, tmp_path, monkeypatch):
    path = tmp_path / "toy.csv"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "run_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        experiments.run_sweep(sweep, [0], path=path)
    assert experiments.finished_runs(path) == set()


def test_held_out_samples_go_beside_the_csv_once_a_run_has_finished(sweep, tmp_path):
    path = tmp_path / "toy.csv"
    experiments.run_sweep(sweep, [0], path=path)
    samples = experiments.load_samples(path)
    assert experiments.samples_path(path) == tmp_path / "toy_samples.csv"
    assert list(samples.columns) == list(experiments.SAMPLE_COLUMNS)
    assert len(samples) == 4 and set(samples["arm"]) == {"a", "b"}
    # texts stay texts (an empty response, one that reads "NA"); a missing KL is NaN, not the string "nan"
    assert samples["response"].tolist()[:2] == ["NA", ""] and samples["kl"].isna().tolist()[:2] == [True, False]
    assert samples["kl"].dtype == float
    with pytest.raises(FileNotFoundError, match="logged no samples"):
        experiments.load_samples(tmp_path / "other.csv")


def test_a_sweep_logs_samples_at_its_first_and_last_evaluation_or_at_every_one():
    assert not experiments.SWEEPS["tricks"].samples_every_eval and experiments.SWEEPS["overoptimisation"].samples_every_eval
    assert experiments.SWEEPS["tricks"].samples_path.name == "08_ppo_tricks_sweep_samples.csv"


def test_a_file_that_is_not_a_sweep_csv_is_never_appended_to(sweep, tmp_path):
    path = tmp_path / "toy.csv"
    path.write_text("arm,reward_gain\nbase,0.3\n")
    with pytest.raises(ValueError, match="is not a sweep CSV"):
        experiments.run_sweep(sweep, [0], path=path)
    assert path.read_text() == "arm,reward_gain\nbase,0.3\n"


def test_an_unknown_arm_is_refused_with_the_list_of_arms(sweep, tmp_path):
    with pytest.raises(SystemExit, match="no arm \\['c'\\].*a, b"):
        experiments.run_sweep(sweep, [0], arms=["c"], path=tmp_path / "toy.csv")


def test_arm_summary_gives_t_intervals_and_differences_in_standard_errors(sweep, tmp_path):
    path = tmp_path / "toy.csv"
    experiments.run_sweep(sweep, [0, 1, 2], path=path)
    summary = experiments.arm_summary(experiments.load_sweep(path), "proxy_reward", baseline="a")
    a, b = summary.loc["a"], summary.loc["b"]
    assert a["seeds"] == 3 and a["mean"] == pytest.approx(2.0) and a["sd"] == pytest.approx(1.0)
    assert a["ci95_high"] - a["mean"] == pytest.approx(4.303 / 3 ** 0.5, abs=1e-3)
    assert b["difference"] == pytest.approx(1.0) and b["difference_in_se"] == pytest.approx(1.0 / (2 / 3) ** 0.5)
    at_start = experiments.arm_summary(experiments.load_sweep(path), "proxy_reward", step=0)
    assert at_start["mean"].tolist() == pytest.approx([0.1, 0.1])
    with pytest.raises(ValueError, match="no rows for metric 'nope'"):
        experiments.arm_summary(experiments.load_sweep(path), "nope")


def test_loading_a_sweep_that_was_never_run_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m rlhf_course.experiments"):
        experiments.load_sweep(tmp_path / "missing.csv")


def test_student_t_cdf_and_welch_df():
    assert student_t_cdf(0.0, 3) == pytest.approx(0.5)
    assert student_t_cdf(4.303, 2) == pytest.approx(0.975, abs=1e-4)
    assert student_t_cdf(-4.303, 2) == pytest.approx(0.025, abs=1e-4)
    assert 2 * (1 - student_t_cdf(2.0, 2)) == pytest.approx(0.1835, abs=1e-3)  # 2 s.e. with 3 seeds: 18% by chance
    assert welch_df(0.1, 3, 0.1, 3) == pytest.approx(4.0)  # equal spreads: the pooled n_a + n_b - 2
    assert welch_df(0.1, 1, 0.1, 3) != welch_df(0.1, 1, 0.1, 3)  # one sample: NaN
    assert welch_df(0.0, 3, 0.0, 3) != welch_df(0.0, 3, 0.0, 3)


def test_student_t_quantiles():
    assert student_t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert student_t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert student_t_quantile(0.025, 1e6) == pytest.approx(-1.960, abs=1e-3)
    with pytest.raises(ValueError):
        student_t_quantile(1.5, 3)


def test_list_names_every_sweep_and_its_csv(capsys):
    experiments.main(["--list"])
    out = capsys.readouterr().out
    for sweep in experiments.SWEEPS.values():
        assert sweep.name in out and sweep.csv in out


def test_every_sweep_logs_to_its_own_csv_that_no_notebook_overwrites():
    """A sweep's CSV sat under the name of the table notebook 08 rewrites each run (08_ppo_tricks.csv)."""
    import json
    import re

    written = set()
    for notebook in experiments.RESULTS.parent.glob("*.ipynb"):
        for cell in json.loads(notebook.read_text())["cells"]:
            written |= set(re.findall(r'results"\) / "([^"]+)"', "".join(cell["source"])))
    assert "08_ppo_tricks.csv" in written  # the scan finds what notebooks write
    csvs = [sweep.csv for sweep in experiments.SWEEPS.values()]
    assert len(set(csvs)) == len(csvs) and not set(csvs) & written


def test_a_reward_scale_arm_trains_on_the_scaled_reward_and_logs_it_on_the_classifier_scale(monkeypatch):
    from rlhf_course.policy import judge, sentiment
    from rlhf_course.rl import sampling

    seen = {}

    def fake_train_ppo(config, policy, reference, tokenizer, reward_fn, queries, callback=None, **kwargs):
        seen["rewards"] = reward_fn(["a", "b"]).tolist()
        callback(0, {"reward_mean": 5.0, "return_mean": 5.0}, [])

    monkeypatch.setattr(lora_policy, "load_smollm2_policy_and_reference", lambda device, critic: (None, None, None))
    monkeypatch.setattr(sentiment, "sentiment_reward", lambda device: (lambda texts: torch.ones(len(texts))))
    monkeypatch.setattr(judge, "GoldJudge", lambda: None)
    monkeypatch.setattr(sampling, "train_and_eval_queries", lambda tokenizer, config, n_eval: ([[1]], [[1]]))
    monkeypatch.setattr(ppo, "train_ppo", fake_train_ppo)
    rows = experiments.run_rows(experiments.SWEEPS["critic_growth"], "scaled_rm", 0, heldout=False, steps=1)
    assert seen["rewards"] == [5.0, 5.0]  # PPO sees the classifier's logits x5
    logged = {row["metric"]: row["value"] for row in rows}
    assert logged == {"train_reward_mean": 1.0, "train_return_mean": 5.0}  # reward back on the classifier's scale


def test_a_separate_critic_keeps_value_gradients_out_of_the_actor():
    lm = tiny_llama()
    critic_lm = copy.deepcopy(lm)
    actor, _ = lora_policy.lora_policy_and_reference(lm, r=4, alpha=8.0)
    critic = ppo.PolicyWithValueHead(lora_policy.add_lora_adapter(critic_lm, r=4, alpha=8.0, seed=1))
    torch.nn.init.normal_(critic.v_head.weight)  # a zero head would pass no gradient at all
    policy = lora_policy.ActorWithSeparateCritic(actor.lm, critic)
    ids, mask = torch.randint(3, 1000, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    logits, values = policy(ids, mask, logits_to_keep=3)
    assert logits.shape[:2] == values.shape == (2, 3)
    values.sum().backward()
    actor_grads = [p.grad for n, p in actor.lm.named_parameters() if p.requires_grad]
    critic_grads = [p.grad for n, p in critic.lm.named_parameters() if "lora_B" in n]
    assert all(g is None or not g.any() for g in actor_grads)
    assert any(g is not None and g.any() for g in critic_grads)


def test_replay_sets_a_short_rerun_beside_the_logged_rows(sweep, tmp_path, monkeypatch):
    logged = pd.DataFrame([
        {"sweep": "toy", "arm": "a", "seed": 0, "step": step, "metric": metric, "value": value, "seconds": 1.0,
         "machine": "m", "commit": "c", "profile": "laptop"}
        for step, metric, value in [(1, "train_kl", 0.5), (2, "train_kl", 0.7), (3, "train_kl", 0.9),
                                    (1, "train_reward_mean", 0.1), (2, "train_reward_mean", 0.2)]])
    calls = []

    def short_run(sweep, arm, seed, profile, device, steps=None, heldout=True):
        calls.append((arm, seed, steps, heldout))
        return [{"step": s, "metric": m, "value": v} for s, m, v in
                [(1, "train_kl", 0.5), (2, "train_kl", 0.75), (1, "train_reward_mean", 0.1), (2, "train_reward_mean", 0.2),
                 (2, "train_grad_norm", 3.0)]]

    monkeypatch.setattr(experiments, "run_rows", short_run)
    table = experiments.replay(sweep, logged, "a", 0, steps=2, metrics=("train_kl", "train_reward_mean"))
    assert calls == [("a", 0, 2, False)]  # short, and without the held-out evaluations
    assert len(table) == 4 and table.loc[(2, "train_kl"), "difference"] == pytest.approx(0.05)
    assert table.loc[(1, "train_reward_mean"), "difference"] == 0.0
    with pytest.raises(ValueError, match="replay 1 to 4 steps"):
        experiments.replay(sweep, logged, "a", 0, steps=5)
    with pytest.raises(ValueError, match="no logged laptop-profile rows for arm 'b'"):
        experiments.replay(sweep, logged, "b", 0, steps=2)


def test_arm_table_and_plot_arms_show_every_arm_with_its_interval(sweep, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    path = tmp_path / "toy.csv"
    experiments.run_sweep(sweep, [0, 1, 2], path=path)
    frame = experiments.load_sweep(path)
    table = experiments.arm_table(frame, {"proxy_reward": "proxy"}, baseline="a")
    assert table["seeds"].tolist() == [3, 3]
    assert table.loc["a", "proxy"] == "2 [-0.484, 4.48]"  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert table.loc["b", "proxy vs a, s.e."] == pytest.approx(1.2)
    one_seed = experiments.arm_table(frame[frame["seed"] == 0], {"proxy_reward": "proxy"}, baseline="a")
    assert one_seed.loc["b", "proxy"] == "2 (one seed)"
    fig = experiments.plot_arms(frame, {"proxy_reward": "proxy"}, arms=["b", "a", "missing"])
    axis = fig.axes[0]
    assert [label.get_text() for label in axis.get_xticklabels()] == ["b", "a"]
    dots = [line for line in axis.lines if line.get_marker() == "o"]
    assert sorted(dots[1].get_ydata()) == [1.0, 2.0, 3.0]  # arm a's three seeds at its last step, not step 0
    metrics = {name: name for name in ("m1", "m2", "m3", "m4")}
    many = pd.concat([frame.assign(metric=name) for name in metrics])
    grid = experiments.plot_arms(many, metrics)  # three panels to a row: 2 rows, the sixth place hidden
    assert len(grid.axes) == 6 and [axis.get_title() for axis in grid.axes if axis.get_visible()] == list(metrics)


def test_plot_metric_curves_draws_each_seed_and_the_mean_with_its_interval(sweep, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    path = tmp_path / "toy.csv"
    experiments.run_sweep(sweep, [0, 1, 2], path=path)
    frame = experiments.load_sweep(path)
    fig = experiments.plot_metric_curves(frame, {"proxy_reward": "proxy"}, arms=["b", "missing"])
    axis = fig.axes[0]
    runs = frame[(frame["arm"] == "b") & (frame["metric"] == "proxy_reward")].pivot_table(
        index="step", columns="seed", values="value")
    assert len(axis.lines) == 3 + 1  # three seeds and their mean; no line for an arm with no rows
    assert list(axis.lines[-1].get_ydata()) == pytest.approx(list(runs.mean(axis=1)))
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["b (3 seeds)"]
    band = axis.collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() > runs.mean(axis=1).max()  # a t-interval over three seeds that differ


def test_pairwise_differences_test_each_pair_with_welch():
    rows = [{"arm": arm, "seed": seed, "step": 5, "metric": "gold", "value": value}
            for arm, values in {"a": [1.0, 1.1, 0.9], "b": [0.0, 0.2, -0.2], "c": [0.9, 1.5, 0.3], "d": [7.0]}.items()
            for seed, value in enumerate(values)]
    pairs = experiments.pairwise_differences(pd.DataFrame(rows), "gold", arms=["a", "b", "c", "d"]).set_index(["higher", "lower"])
    assert list(pairs.index) == [("d", "a"), ("d", "c"), ("d", "b"), ("a", "c"), ("a", "b"), ("c", "b")]  # by mean
    ab = pairs.loc[("a", "b")]  # se 0.0577 and 0.115: Welch's df = 2.94, not the pooled 4
    assert ab["se"] == pytest.approx((0.01 / 3 + 0.04 / 3) ** 0.5)
    assert ab["welch_df"] == pytest.approx((0.05 / 3) ** 2 / ((0.01 / 3) ** 2 / 2 + (0.04 / 3) ** 2 / 2))
    assert ab["beyond_95"] and ab["difference_in_se"] == pytest.approx(1.0 / ab["se"])
    assert not pairs.loc[("a", "c"), "beyond_95"]  # a small gap against a wide spread
    assert pairs.loc[("d", "a"), "beyond_95"] is None  # one seed of d: nothing to test against


def training_rows(values_by_arm: dict[str, list[list[float]]]):
    """A frame of one training metric: arm -> one list of per-step values per seed (steps 1, 2, ...)."""
    return pd.DataFrame([{"arm": arm, "seed": seed, "step": step, "metric": "train_loss", "value": value}
                         for arm, runs in values_by_arm.items() for seed, run in enumerate(runs)
                         for step, value in enumerate(run, start=1)])


def test_arm_summary_averages_each_run_over_its_last_steps():
    frame = training_rows({"a": [[9.0, 1.0, 3.0], [9.0, 2.0, 4.0]], "b": [[0.0, 5.0, 7.0], [0.0, 6.0, 8.0]]})
    assert experiments.arm_summary(frame, "train_loss").loc["a", "mean"] == pytest.approx(3.5)  # last step only
    two = experiments.arm_summary(frame, "train_loss", baseline="a", last_steps=2)
    assert two.loc["a", "mean"] == pytest.approx(2.5) and two.loc["b", "mean"] == pytest.approx(6.5)
    assert two.loc["a", "sd"] == pytest.approx(2 ** 0.5 / 2)  # the runs' averages 2.0 and 3.0 are the samples
    assert experiments.arm_summary(frame, "train_loss", last_steps=9).loc["a", "mean"] == pytest.approx(14 / 3)
    with pytest.raises(ValueError, match="last_steps"):
        experiments.arm_summary(frame, "train_loss", step=2, last_steps=2)
    with pytest.raises(ValueError, match="last_steps"):
        experiments.arm_summary(frame, "train_loss", last_steps=0)


def test_effect_text_states_the_difference_in_standard_errors_and_the_verdict():
    frame = training_rows({"base": [[1.0], [1.2], [0.8]], "far": [[3.0], [3.2], [2.8]], "near": [[1.1], [1.5], [0.7]],
                           "alone": [[5.0]]})
    far = experiments.effect_text(frame, "far", "train_loss", "loss")
    assert far.startswith("loss 3 [") and "`base`" in far and "+2" in far and "beyond Welch's 95% threshold of 2.8" in far
    assert "within 2 s.e." in experiments.effect_text(frame, "near", "train_loss", "loss")
    df, t95 = experiments.welch_test(*(experiments.arm_summary(frame, "train_loss").loc[a] for a in ("far", "base")))
    assert df == pytest.approx(4.0) and t95 == pytest.approx(2.776, abs=1e-3)
    frame = pd.concat([frame, training_rows({"mid": [[1.6], [1.2], [2.0]]})])  # +2.3 s.e., Welch df 2.9: t95 3.2
    assert "beyond 2 s.e. but within Welch's 95% threshold of 3.2" in experiments.effect_text(frame, "mid", "train_loss", "loss")
    assert "one seed" in experiments.effect_text(frame, "alone", "train_loss", "loss")
    with pytest.raises(ValueError, match="no 'train_loss' rows for arm 'missing'"):
        experiments.effect_text(frame, "missing", "train_loss", "loss")
