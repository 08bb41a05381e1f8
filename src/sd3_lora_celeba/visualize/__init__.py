"""Attention visualisation: base model vs LoRA checkpoints.

``capture`` (attention probabilities and outputs of SD3 joint attention, no UI), ``ncut`` (joint NCUT colours),
``explorer`` (generation with the same seed for every model, under capture), ``figures`` (matplotlib panels) and
``app`` (the Gradio UI of ``sd3 visualize-attention-weights``).
"""
