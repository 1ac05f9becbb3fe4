"""Pure tensor attention ops (torch, triton). Never imports megatron or deepspeed."""

from megatron_ext.ops.attention_ref import attention_ref
from megatron_ext.ops.merge import merge_attn_outputs
from megatron_ext.ops.rope import RopeScaling, apply_rope, rope_cos_sin
