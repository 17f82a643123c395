"""inference.py's library side, one module per job:

- loading.py: a model from the arguments alone (--model, --pt-checkpoint, --adapter) into a Session;
- generation.py: prompts rendered as in training, generation, decoding;
- chat.py: the streamed terminal chat;
- evaluation.py: batch prediction, ROUGE/BLEU scores, the before/after comparison;
- merge.py: scripts/merge_adapter.py;
- cli.py: inference.py's arguments and main.
"""
