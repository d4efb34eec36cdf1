"""Stage 1, the policy before RL (notebook 06): the SFT policy and the sentiment classifier used as reward."""
