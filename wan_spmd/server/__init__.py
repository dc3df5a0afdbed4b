"""The HTTP front: a FastAPI app in rank 0's background thread. Imports neither torch nor the pipeline."""
