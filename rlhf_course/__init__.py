"""Helper package for the RLHF course notebooks.

Notebooks import from here and never define a function another notebook needs.  One module per
concept, by folder; a layer imports only the layers listed under it (docs/architecture.md;
tests/test_layout.py checks the rule and that this list names every module):

core/      the base every stage uses; imports only core
    core.profiles       the laptop / full switch, device choice, mixed precision, seeding
    core.hub            where a full-profile hub model or data set is read from: local folder, HF cache, hub/mirror
    core.smoke          smoke mode: the full profile's code paths at tiny sizes, all listed in one place
    core.assets         the asset registry with provenance: every model, tokenizer and data set
    core.cache          derived assets built once, atomically, with a manifest checked on use
    core.netguard       the guard that refuses every non-loopback connection
    core.text           padding side and the batched tokenise-forward-collect loop
    core.stats          masked mean / variance / whitening, running moments
    core.distributed    Accelerate wrappers: sharding, gathering, checkpoints, rank reports
    core.config         the config-dataclass convention: reference defaults, laptop overrides
    core.cli            the scripts' command lines, generated from the config dataclasses
    core.quiet          quiet_loading: model loading without progress bars, load reports, PEFT warnings
reward/    stage 2, the reward model (notebooks 01-05); imports core
    reward.losses       pairwise, K-wise, centred and point-wise reward losses
    reward.readout      where the scalar is read from: last token, mean, CLS, pooling
    reward.token_loss   the token-level pairwise (divergence) loss, vectorised
    reward.preference_parsing  hh-rlhf / hh_rlhf_cn records parsed and checked, with a load report
    reward.data         preference data sets: laptop records, prompt templates, splits, tokenising
    reward.training     LoRA reward-model training: TRL's RewardTrainer and the seed's Trainer
    reward.evaluation   accuracy on held-out pairs, and what accuracy does not show
policy/    stage 1, the policy before RL (notebook 06); imports core
    policy.sft          the SFT policy: a small GPT-2 trained on movie reviews
    policy.smollm2_sft  the pretrained SFT policy: SmolLM2-135M + a LoRA adapter fine-tuned on reviews
    policy.sentiment    the sentiment classifier whose POSITIVE logit is the PPO reward
    policy.judge        the gold judge (VADER), never trained against, with paired standard errors
rl/        stage 3, reinforcement learning (notebooks 07-09); imports policy and core
    rl.ppo              PPO for language models, from scratch, in one file
    rl.sampling         the prompts and the batched generation of a rollout
    rl.lora_policy      PPO on SmolLM2 with LoRA: adapter-off reference view, held-out evaluation
    rl.tricks           the scaled reward and text statistics of notebook 08's sweeps (the sweeps: experiments)
    rl.beyond_ppo       DPO, RLOO and GRPO through TRL, against PPO (notebook 09)
    rl.compare_methods  notebook 09's sweep: DPO, RLOO, GRPO and PPO on one budget, on the real policy
course/    on top: runs the course; may import anything
    course.notebook     what each notebook's first cell calls (start), environment check, REPO
    course.runner       executes every notebook and records its wall time
    course.benchmarks   the timed benchmarks (token loss, rollout, PPO step)
    course.plots        shared figures: the RLHF stages, LivePlot
    course.memory       the GPU-memory table of docs/cluster.md
    course.badges       the Colab badges and install cells of the notebooks and README, rendered from REPO
    course.figures      expect(): every figure a notebook states, checked against its range and recorded
    course.standins     tiny random stand-ins of the hub models and data, for running the full profile offline
scripts, on top:
    bench               python -m rlhf_course.bench NAME: runs a benchmark or the whole course
    train_reward        python -m rlhf_course.train_reward: the reward-model script
    train_ppo           python -m rlhf_course.train_ppo: the PPO script
    experiments         python -m rlhf_course.experiments SWEEP: resumable multi-seed sweeps, logged to a long CSV
"""

from rlhf_course.core import netguard as _netguard

__version__ = "0.1.0"

_netguard.install_if_requested()
