"""Accuracy checks of a running OpenAI-compatible server (ours or another, such as vLLM): `omniserve eval gsm8k`."""
