"""Context parallelism. The process group is always an argument; no megatron/deepspeed imports."""
