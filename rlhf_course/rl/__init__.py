"""Stage 3, reinforcement learning (notebooks 07-09): PPO, its tricks, and DPO / RLOO / GRPO."""
