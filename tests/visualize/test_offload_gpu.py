"""``--offload model`` on a real GPU: nothing of the pipeline stays on the device between calls, and the images
equal the resident pipeline's (no gradio or matplotlib needed, so the device check runs it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.gpu
def test_offloaded_explorer_leaves_the_gpu_empty_and_draws_the_same_images(tiny_sd3, lora_dirs):
    from diffusers import StableDiffusion3Pipeline

    from sd3_lora_celeba.visualize.explorer import AttentionExplorer

    def explorer(offload: bool) -> AttentionExplorer:
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, torch_dtype=torch.bfloat16)
        pipe.transformer.eval()
        return AttentionExplorer(pipe, lora_dirs, device="cuda", max_sequence_length=64, offload=offload)

    call = dict(prompts="a smiling woman", seed=3, num_inference_steps=2, guidance_scale=4.0, blocks=(1,))
    resident = explorer(False)
    want = resident.generate(**call)
    del resident
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    offloaded = explorer(True)
    assert torch.cuda.memory_allocated() == before  # every model waits in CPU memory
    got = offloaded.generate(**call)
    # and goes back there after each call; the scheduler keeps its few timesteps on the device (1 KiB), the
    # smallest model (a text encoder) would be 68 KiB
    assert torch.cuda.memory_allocated() - before < 32 * 2**10
    assert next(offloaded.pipe.transformer.parameters()).device.type == "cpu"
    for a, b in zip(got.prompts[0].images, want.prompts[0].images, strict=True):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
