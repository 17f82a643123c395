"""Online reinforcement learning with verifiable rewards (finetune.py --stage grpo): prompts.py turns records of
any chat format into prompts rendered with the model's own template (and their reference answers), rewards.py holds
the built-in reward functions, loads a user's, and checks them all before training. The stage itself is
chatft.training.grpo."""
