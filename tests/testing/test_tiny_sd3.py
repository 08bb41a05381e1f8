"""The tiny SD3 world loads through the standard diffusers route and is deterministic."""

import torch
from diffusers import StableDiffusion3Pipeline

from sd3_lora_celeba.models.loading import load_text_encoder, load_transformer
from sd3_lora_celeba.testing.tiny_sd3 import TINY_IMAGE_SIZE, build_tiny_sd3


def test_tiny_pipeline_round_trips_and_is_deterministic(tmp_path):
    path = build_tiny_sd3(tmp_path / "sd3")
    assert (path / "model_index.json").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    assert len(pipe.transformer.transformer_blocks) == 24  # the README's --lora-blocks 4..22 exist
    images = [
        pipe(
            "a smiling woman",
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        for _ in range(2)
    ]
    assert images[0].shape == (1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert (images[0] == images[1]).all()
    # A second build from the same spec gives the same weights (seeded).
    other = load_transformer(str(build_tiny_sd3(tmp_path / "again")))
    for (n, a), (_, b) in zip(pipe.transformer.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_tokenizers_make_word_tokens(tmp_path):
    path = build_tiny_sd3(tmp_path / "sd3")
    _, clip_tok = load_text_encoder(1, str(path))
    assert clip_tok.tokenize("a smiling woman") == ["a</w>", "smiling</w>", "woman</w>"]
    model, t5_tok = load_text_encoder(3, str(path))
    assert not model.training
    assert t5_tok("a woman").input_ids[-1] == t5_tok.eos_token_id


def test_tokenizers_are_identical_across_processes():
    import subprocess
    import sys

    code = (
        "from sd3_lora_celeba.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer;"
        "import json;"
        "print(json.dumps([sorted(build_clip_tokenizer().get_vocab().items()),"
        " sorted(build_t5_tokenizer().get_vocab().items())]))"
    )
    outputs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert outputs[0] == outputs[1]
