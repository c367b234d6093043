"""Serving converted hybrid checkpoints with inference engines.

`hf_hybrid_attn.serving.vllm` is the vLLM plugin (entry point `vllm.general_plugins`, installed with
`pip install hf-hybrid-attn[vllm]`); see docs/VLLM.md. Nothing is imported here: vLLM loads the
plugin module itself.
"""
