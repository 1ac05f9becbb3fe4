"""Pure tensor attention ops (torch, triton). Never imports megatron or deepspeed."""
