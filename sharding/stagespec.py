"""A pipeline stage's place in the model: which blocks it holds, and whether it holds the embedding or the LM head."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: blocks [block_start, block_end), plus embedding and/or LM head."""

    index: int  # position of this stage in the pipeline, 0-based
    num_stages: int  # total number of stages in the pipeline
    block_start: int  # first block held by this stage
    block_end: int  # one past the last block held by this stage
    has_embedding: bool  # holds the token embedding (the first stage)
    has_lm_head: bool  # holds the final norm, LM head and loss (the last stage)

    @property
    def is_first(self) -> bool:
        """First stage of the pipeline."""
        return self.index == 0

    @property
    def is_last(self) -> bool:
        """Last stage of the pipeline."""
        return self.index == self.num_stages - 1

    @property
    def blocks(self) -> range:
        """Global indices of the blocks held by this stage."""
        return range(self.block_start, self.block_end)


def full_spec(config: ModelConfig) -> StageSpec:
    """The single stage holding the whole model."""
    return StageSpec(0, 1, 0, config.n_layers, True, True)
