"""inference.py's library side, one module per job:

- loading.py: a model from the arguments alone (--model, --pt-checkpoint, --adapter) into a Session;
- generation.py: prompts rendered as in training, generation, decoding;
- reasoning.py: a reasoning model's answer split into its reasoning and the answer (chat, prediction, server);
- chat.py: the streamed terminal chat;
- evaluation.py: batch prediction, ROUGE/BLEU scores, the before/after comparison;
- merge.py: scripts/merge_adapter.py;
- the OpenAI-compatible server: openai_schema.py (requests, errors, answer shapes), streaming.py (text held back
  while it may still become a stop string or a tool call), toolcalls.py (tool calls read back from an answer),
  scheduler.py (queue, batching, limits), serve.py (the app, startup) and chat.html (the page);
- cli.py: inference.py's arguments and main.
"""
