"""wan_spmd: serve Wan2.2 video models as one torchrun SPMD program, no result hops."""

__version__ = "0.1.0"
