"""megatron_ext: Megatron-core extensions for long-context training and inference.

Attention methods (CoCA, hybrid RoPE/NoPE, LongHeads, Dual Chunk Attention), context
parallelism, DeepSpeed-driven continued pretraining, long-context inference and checkpoint
conversion. Import tiers flow one way: ops <- parallel <- layers <- specs <- train/inference.
"""

__version__ = "0.1.0"
