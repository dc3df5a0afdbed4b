"""The `serve` front's glue between the HTTP app and the SPMD loop (issue 5)."""
