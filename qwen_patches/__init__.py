"""The Qwen2.5-VL family (transformers' Qwen2_5_VLForConditionalGeneration) behind restore's model-family seam.

It runs in its own environment, ``.venv-qwen`` (``make install-qwen``: transformers 4.57.6, see
requirements-qwen.txt); in the LLaVA environment (transformers 4.37.2, which has no Qwen2.5-VL) the family
is registered but unavailable (``restore.families.unavailable_families()``). Importing this package
imports no transformers: everything that needs it is imported where it is used.
"""
