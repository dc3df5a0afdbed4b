"""The `batch` front: jobs from a JSONL file, resumable and shardable (issue 7)."""
