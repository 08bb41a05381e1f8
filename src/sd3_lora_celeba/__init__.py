"""sd3-lora-celeba: fine-tune Stable Diffusion 3 with LoRA on CelebA faces and show what changed."""

__version__ = "0.1.0"
