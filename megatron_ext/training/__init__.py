"""Training: the loop, the DeepSpeed engine, checkpoints, the chunked loss, preflight checks.

`python -m megatron_ext.train` is the entry point; `megatron_ext.training.loop.train` is the
function behind it. Modules: loop (the steps), engine (DeepSpeed), optim (the plain AdamW
path), checkpointing (atomic, verified training checkpoints), continued (which switches
`train.init_from` allows), loss (chunked cross-entropy), recompute (activation
checkpointing), preflight (checks before any file is written), observe (world layout, MFU),
schedule (learning rate and sequence-length warm-up), batches (resumable batch stream),
evaluate (held-out perplexity of a checkpoint at several lengths).
"""
