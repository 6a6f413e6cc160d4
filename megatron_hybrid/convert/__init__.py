"""Conversion: HF Llama/Qwen2 <-> Megatron checkpoints, merge of hybrid trainables, HF PEFT export."""
