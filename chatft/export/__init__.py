"""Export a trained model to other runtimes: GGUF for llama.cpp / Ollama / LM Studio (gguf.py), with an Ollama
Modelfile (modelfile.py); command.py is scripts/export_gguf.py."""
