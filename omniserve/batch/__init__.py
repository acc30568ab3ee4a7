"""The Batch API: OpenAI's Files and Batches, kept durably in SQLite, each line served as best effort beside live
traffic (service.py says how)."""
