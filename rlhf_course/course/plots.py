"""Figures shared by several notebooks."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

# The three stages of RLHF as described by InstructGPT (Ouyang et al. 2022, arXiv 2203.02155, fig. 2)
# and DeepSpeed-Chat's step 1 / 2 / 3: each box is (title, what goes in, what comes out, notebooks).
RLHF_STAGES = [
    ("1. Supervised fine-tuning", "demonstrations\n(prompt, good answer)", "SFT policy", "06"),
    ("2. Reward model", "human preferences\n(prompt, chosen, rejected)", "scalar reward r(x, y)", "01-05"),
    ("3. RL (PPO) against the RM", "prompts only;\nKL penalty to the SFT policy", "aligned policy", "07-09"),
]


def draw_rlhf_stages(ax=None):
    """Draw the SFT -> reward model -> RL pipeline with the notebooks that cover each stage."""
    if ax is None:
        _, ax = plt.subplots(figsize=(12, 3.2))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 3.2)
    ax.axis("off")
    colours = ["#cfe2f3", "#fde9c4", "#d9ead3"]
    for index, (title, inputs, output, notebooks) in enumerate(RLHF_STAGES):
        left = 0.2 + index * 4
        box = FancyBboxPatch((left, 0.4), 3.4, 2.4, boxstyle="round,pad=0.05", fc=colours[index], ec="#444")
        ax.add_patch(box)
        ax.text(left + 1.7, 2.45, title, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(left + 1.7, 1.7, f"in: {inputs}", ha="center", va="center", fontsize=9)
        ax.text(left + 1.7, 0.95, f"out: {output}", ha="center", va="center", fontsize=9, style="italic")
        ax.text(left + 1.7, 0.55, f"notebooks {notebooks}", ha="center", va="center", fontsize=8, color="#555")
        if index < len(RLHF_STAGES) - 1:
            arrow = FancyArrowPatch((left + 3.45, 1.6), (left + 4.15, 1.6), arrowstyle="-|>", mutation_scale=18)
            ax.add_patch(arrow)
    ax.set_title("The three stages of RLHF (InstructGPT; DeepSpeed-Chat steps 1-3)", fontsize=12)
    return ax


class LivePlot:
    """A ``train_ppo`` callback that redraws reward, KL and losses in place while training runs.

    Uses an IPython display handle, so the figure updates inside the notebook cell (and the last
    version is what an executed notebook keeps); outside IPython it draws once at the end.
    """

    PANELS = (("reward_mean", "mean reward (POSITIVE logit)"), ("kl", "KL to reference (nats / response)"),
              ("policy_loss", "policy loss"), ("value_loss", "value loss"))

    def __init__(self, every: int = 1, panels=PANELS):
        import matplotlib.pyplot as plt

        self.every, self.panels = every, panels
        self.figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
        self.axes = list(axes) if len(panels) > 1 else [axes]
        plt.close(self.figure)  # shown through the display handle only
        self.handle = None
        try:
            from IPython.display import display

            self.handle = display(self.figure, display_id=True)
        except Exception:  # not in IPython: nothing to update live
            self.handle = None

    def __call__(self, step: int, metrics: dict, history: list[dict]) -> None:
        if step % self.every:
            return
        self.draw(history)

    def draw(self, history: list[dict]) -> None:
        steps = [h["step"] for h in history]
        for axis, (key, title) in zip(self.axes, self.panels):
            axis.clear()
            axis.plot(steps, [h[key] for h in history], marker=".")
            axis.set_title(title, fontsize=10)
            axis.set_xlabel("PPO step")
        self.figure.tight_layout()
        if self.handle is not None:
            self.handle.update(self.figure)
