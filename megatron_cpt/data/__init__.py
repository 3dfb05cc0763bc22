"""Data stages: JSONL reading, tokenized indexed shards, blending and selection."""
