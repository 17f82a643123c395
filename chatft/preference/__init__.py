"""Preference data (finetune.py --stage dpo|orpo|simpo|kto): formats.py reads the records, encode.py turns them into
ids with SFT's exact rendering and labels; pairs.py makes pairs from a model's answers, score.py scores a model on
pairs. The training stage itself is chatft.training.preference."""
