"""Where the VAE's decode runs: the decode seam's implementations.

Every rank calls the decoder inside the job's collective part, so a parallel decode can split each
chunk of latent frames over the ranks and gather it to rank 0 chunk by chunk. The implementation
here is the first one: rank 0 decodes everything, the other ranks yield nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

Decoder = Callable[["WanVideoPipeline", torch.Tensor], Iterator[torch.Tensor]]  # noqa: F821


def single_rank_decoder(is_main: bool) -> Decoder:
    """Rank 0 decodes the whole video with its own VAE; other ranks have nothing to do."""

    def decode(pipe, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        if is_main:
            yield from pipe.decode_chunks(latents)

    return decode
