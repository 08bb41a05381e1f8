"""Attention visualisation: base model vs LoRA checkpoints.

``capture`` (the kept image<->text probabilities and NCUT features of SD3 joint attention and of SD3.5's ``attn2``,
no UI), ``ncut`` (joint NCUT colours, equal for equal features), ``explorer`` (generation with the same seed for
every model under capture, prompt words, maps of any captured blocks/steps), ``figures`` (heatmaps on the images,
word rows, exports) and ``app`` (the Gradio UI of ``sd3 visualize-attention-weights``).
"""
