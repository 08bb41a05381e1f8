"""The tiny captioners load through the standard from_pretrained path and are small and seeded."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, Blip2ForConditionalGeneration

from sd3_lora_celeba.testing.tiny_captioners import LLAMA3_SPECIAL_TOKENS, build_tiny_blip2


def _size_mb(path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def test_tiny_blip2_loads_and_captions(tiny_blip2):
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_blip2).eval()
    processor = AutoProcessor.from_pretrained(tiny_blip2)
    assert _size_mb(tiny_blip2) < 5
    assert processor.num_query_tokens == model.config.num_query_tokens
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token.content)
    assert model.config.image_token_index == image_token_id
    assert processor.tokenizer.eos_token == "</s>" and processor.tokenizer.pad_token_id == 0
    images = [Image.new("RGB", (50, 40), (200, 10 * i, 30)) for i in range(2)]
    inputs = processor(images=images, text=["", ""], return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    # The query-token placeholders come first, then T5's </s>.
    assert inputs["input_ids"][0].tolist() == [image_token_id] * model.config.num_query_tokens + [1]
    output_ids = model.generate(**inputs, max_new_tokens=5)
    assert output_ids.shape[0] == 2 and output_ids.shape[1] <= 6


def test_tiny_blip2_is_seeded(tmp_path, tiny_blip2):
    again = build_tiny_blip2(tmp_path / "again", seed=0)
    other = build_tiny_blip2(tmp_path / "other", seed=1)
    weights = {
        p.name: Blip2ForConditionalGeneration.from_pretrained(p).state_dict()
        for p in (tiny_blip2, again, other)
    }
    name = "language_projection.weight"
    assert torch.equal(weights[tiny_blip2.name][name], weights["again"][name])
    assert not torch.equal(weights[tiny_blip2.name][name], weights["other"][name])


def test_tiny_llama3_has_chat_template_and_special_tokens(tiny_llama3):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama3)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama3).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert _size_mb(tiny_llama3) < 5
    for token in LLAMA3_SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
    assert tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nDescribe.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # Byte-level: any text round-trips.
    ids = tokenizer("Zoë's façade", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "Zoë's façade"
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
