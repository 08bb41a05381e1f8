"""sample stage: image generation from cached prompt embeddings, with or without LoRA."""
