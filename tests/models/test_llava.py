"""Image input, LLaVA-style: tiny random LLaVAs (a CLIP tower, and a SigLIP one with two feature
layers) against transformers on the same weights and images, image parts in chats, the prefix
cache keyed per image, prompt chunks that cut an image, and the refusals (no URL is fetched)."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

import helpers
from asyncllm import LLM, SamplingParams
from asyncllm.errors import InvalidRequestError

pytestmark = pytest.mark.timeout(300)

ONE_IMAGE = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TWO_IMAGES = "USER: <image>\n<image>\nWhich of the two is brighter? ASSISTANT:"
# Long enough that whole blocks of text come before the image (block size 16).
LONG_PREFIX = "USER: " + " ".join(helpers.TEXT_PROMPTS * 2) + " <image>\nAnd this one? ASSISTANT:"


def image(seed: int, size: tuple[int, int] = (40, 52)):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def data_url(img, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=3)


def transformers_greedy(path: str, prompt: str, images: list, max_tokens: int):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0)
    prompt_ids = inputs["input_ids"][0].tolist()
    return prompt_ids, out.sequences[0, len(prompt_ids):].tolist(), [logits[0] for logits in out.logits]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def llava(request, tiny_llava):
    path = tiny_llava(request.param)
    llm = LLM(path, dtype="float32")
    yield path, llm
    llm.engine.shutdown()


def test_matches_transformers_with_one_and_two_images_batched_and_alone(llava):
    path, llm = llava
    cases = [(ONE_IMAGE, [image(1)]), (ONE_IMAGE, [image(2)]), (TWO_IMAGES, [image(3), image(4, (64, 30))]),
             ("USER: no image here ASSISTANT:", [])]
    prompts = [{"prompt": text, "multi_modal_data": {"image": images}} for text, images in cases]
    batched = llm.generate(prompts, greedy(), use_tqdm=False)
    for (text, images), out in zip(cases, batched):
        hf_prompt, hf_tokens, hf_logits = transformers_greedy(path, text, images, 12)
        assert out.prompt_token_ids == hf_prompt  # placeholders expanded as transformers' processor does
        assert out.outputs[0].token_ids == hf_tokens
        helpers.check_logprobs(out.outputs[0], hf_logits)
    alone = [llm.generate([p], greedy(), use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert alone == [out.outputs[0].token_ids for out in batched]
    # The image matters: the same words with another image continue otherwise.
    assert batched[0].outputs[0].token_ids != batched[1].outputs[0].token_ids


def test_chat_image_parts_equal_the_prompt_form(llava):
    _, llm = llava
    img = image(5)
    expected = llm.generate([{"prompt": ONE_IMAGE, "multi_modal_data": {"image": img}}], greedy(),
                            use_tqdm=False)[0]
    for part in ({"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "image_pil", "image_pil": img},
                 {"type": "image_url", "image_url": data_url(img, "WEBP")}):
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "What is in the picture?"}]}]
        out = llm.chat(messages, greedy(), use_tqdm=False)[0]
        assert out.prompt_token_ids == expected.prompt_token_ids
        if part["type"] == "image_url" and "webp" in str(part["image_url"]):
            continue  # WEBP is lossy: other pixels, so only the prompt is the same
        assert out.outputs[0].token_ids == expected.outputs[0].token_ids


def test_prefix_cache_key_is_the_image(tiny_llava):
    path = tiny_llava("clip")
    llm = LLM(path, dtype="float32")
    fresh = LLM(path, dtype="float32", enable_prefix_caching=False)
    try:
        def run(engine, img):
            return engine.generate([{"prompt": LONG_PREFIX, "multi_modal_data": {"image": img}}], greedy(),
                                   use_tqdm=False)[0]

        first = run(llm, image(6))
        offset = first.prompt_token_ids.index(llm.get_tokenizer().convert_tokens_to_ids("<image>"))
        assert offset >= 32
        again = run(llm, image(6))
        assert again.num_cached_tokens >= (offset + 25) // 16 * 16 > offset  # the image's blocks too
        assert again.outputs[0].token_ids == first.outputs[0].token_ids
        other = run(llm, image(7))
        # Only the text before the image is shared: the block holding its first placeholder is not.
        assert other.num_cached_tokens == offset // 16 * 16
        assert other.outputs[0].token_ids == run(fresh, image(7)).outputs[0].token_ids
        assert other.outputs[0].token_ids != first.outputs[0].token_ids
    finally:
        llm.engine.shutdown()
        fresh.engine.shutdown()


def test_prompt_chunks_cut_images_and_the_tower_runs_once_per_image(tiny_llava):
    path = tiny_llava("siglip")
    whole = LLM(path, dtype="float32")
    chunked = LLM(path, dtype="float32", max_num_batched_tokens=7, enable_prefix_caching=False)
    model = chunked.engine.core.executor.worker.runner.model
    calls: list[int] = []
    original = model.image_features

    def counting(pixels):
        calls.append(pixels.shape[0])
        return original(pixels)

    model.image_features = counting
    try:
        prompts = [{"prompt": TWO_IMAGES, "multi_modal_data": {"image": [image(8), image(9)]}},
                   {"prompt": ONE_IMAGE, "multi_modal_data": {"image": image(10)}}]
        expected = [o.outputs[0].token_ids for o in whole.generate(prompts, greedy(), use_tqdm=False)]
        got = [o.outputs[0].token_ids for o in chunked.generate(prompts, greedy(), use_tqdm=False)]
        assert got == expected
        assert sum(calls) == 3  # 25 placeholders each over 7-token chunks: still once per image
    finally:
        whole.engine.shutdown()
        chunked.engine.shutdown()


@pytest.mark.parametrize("part, message", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "SSRF"),
    ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "SSRF"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,not base64!"}}, "base64"),
    ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}, "data:image/"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"GIF89a junk").decode()}},
     "not a readable image"),
    ({"type": "image_pil", "image_pil": "not an image"}, "data: URL"),
])
def test_bad_images_are_refused_with_the_rule(llava, part, message):
    _, llm = llava
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]
    with pytest.raises(InvalidRequestError, match=message):
        llm.chat(messages, greedy(), use_tqdm=False)


def test_image_caps_and_placeholder_counts(llava):
    from PIL import Image

    _, llm = llava
    huge = Image.new("RGB", (4097, 4097))
    buf = io.BytesIO()
    huge.save(buf, format="PNG")  # a few KB compressed, 16.8 M pixels: refused from its header
    with pytest.raises(InvalidRequestError, match="pixels"):
        llm.generate([{"prompt": ONE_IMAGE, "multi_modal_data": {"image": buf.getvalue()}}], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="1 image placeholder tokens but 0 images"):
        llm.generate([ONE_IMAGE], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="2 image placeholder tokens but 1 images"):
        llm.generate([{"prompt": TWO_IMAGES, "multi_modal_data": {"image": image(1)}}], use_tqdm=False)
    five = "USER: " + "<image>" * 5 + " ASSISTANT:"
    with pytest.raises(InvalidRequestError, match="at most 4 images"):
        llm.generate([{"prompt": five, "multi_modal_data": {"image": [image(i) for i in range(5)]}}], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="only {'image'"):
        llm.generate([{"prompt": ONE_IMAGE, "multi_modal_data": {"video": image(1)}}], use_tqdm=False)


def test_a_text_model_refuses_images(default_llm):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image(1))}},
                                             {"type": "text", "text": "What is this?"}]}]
    with pytest.raises(InvalidRequestError, match="does not take image input"):
        default_llm.chat(messages, use_tqdm=False)


def test_limit_mm_per_prompt_is_validated():
    from asyncllm import EngineArgs

    with pytest.raises(ValueError, match="only 'image'"):
        EngineArgs(limit_mm_per_prompt={"video": 1}).create_engine_config()
    with pytest.raises(ValueError, match="integer >= 0"):
        EngineArgs(limit_mm_per_prompt='{"image": -1}').create_engine_config()


@pytest.mark.parametrize("split", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_split_over_processes_gives_the_same_tokens(tiny_llava, split):
    """The images cross to worker processes (msgpack); the tower runs where tokens enter (every
    tensor-parallel rank, the first pipeline stage)."""
    path = tiny_llava("clip")
    prompts = [{"prompt": TWO_IMAGES, "multi_modal_data": {"image": [image(11), image(12)]}},
               {"prompt": ONE_IMAGE, "multi_modal_data": {"image": image(13)}}]
    one = LLM(path, dtype="float32")
    try:
        expected = [o.outputs[0].token_ids for o in one.generate(prompts, greedy(), use_tqdm=False)]
    finally:
        one.engine.shutdown()
    llm = LLM(path, dtype="float32", **split)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(), use_tqdm=False)] == expected
    finally:
        llm.engine.shutdown()


def test_preempted_requests_recompute_with_their_images(tiny_llava):
    """Three image requests in 9 KV blocks (8 KB each here): they preempt each other while they
    grow, are computed again from their images' kept features, and answer as with room."""
    path = tiny_llava("siglip")
    prompts = [{"prompt": ONE_IMAGE, "multi_modal_data": {"image": image(i)}} for i in (14, 15, 16)]
    roomy = LLM(path, dtype="float32")
    try:
        expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, greedy(40), use_tqdm=False)]
    finally:
        roomy.engine.shutdown()
    tight = LLM(path, dtype="float32", kv_cache_memory=9 * 8 * 1024, enable_prefix_caching=False)
    model = tight.engine.core.executor.worker.runner.model
    calls: list[int] = []
    original = model.image_features
    model.image_features = lambda pixels: calls.append(pixels.shape[0]) or original(pixels)
    try:
        assert [o.outputs[0].token_ids for o in tight.generate(prompts, greedy(40), use_tqdm=False)] == expected
        assert tight.engine.core.scheduler.num_preemptions > 0
        assert sum(calls) == 3
    finally:
        tight.engine.shutdown()
