"""Image input over HTTP: the real openai client sends `image_url` parts (data: URLs) to a tiny
LLaVA on a real uvicorn and gets what the engine answers in process; a URL to fetch, a broken
image and an image for a text model are 400s that name the rule."""
import sys

import anyio
import httpx
import openai
import pytest
from server_helpers import RunningServer

from asyncllm import AsyncEngine, SamplingParams
from asyncllm.server import build_app

sys.path.insert(0, __file__.rsplit("/server/", 1)[0] + "/models")
from test_llava import ONE_IMAGE, data_url, image  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def llava_server(tiny_llava):
    engine = AsyncEngine.from_args(model=tiny_llava("clip"), dtype="float32", served_model_name="llava")
    srv = RunningServer(build_app(engine, run_lifespan=False), lifespan="off")
    yield engine, srv
    srv.stop()
    engine.shutdown()


def _messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is in the picture?"}]}]


def test_openai_client_sends_images_and_gets_the_engines_answer(llava_server):
    engine, srv = llava_server
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["llava"]
    for seed in (1, 2):
        img = image(seed)

        async def in_process():
            async for out in engine.generate({"prompt": ONE_IMAGE, "multi_modal_data": {"image": img}},
                                             SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)):
                pass
            return out.outputs[0].text, len(out.prompt_token_ids)

        expected, prompt_tokens = anyio.run(in_process)
        reply = client.chat.completions.create(model="llava", messages=_messages(data_url(img)), max_tokens=12,
                                               temperature=0, extra_body={"ignore_eos": True})
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == prompt_tokens > 25  # the image's 25 placeholders counted
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="llava", messages=_messages(data_url(img)), max_tokens=12, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if c.choices)
        assert streamed == expected


@pytest.mark.parametrize("url, rule", [("http://169.254.169.254/latest/meta-data", "SSRF"),
                                       ("data:image/png;base64,AAAA", "not a readable image")])
def test_bad_image_urls_are_400s_naming_the_rule(llava_server, url, rule):
    _, srv = llava_server
    response = httpx.post(srv.url + "/v1/chat/completions", json={"model": "llava", "messages": _messages(url)},
                          timeout=60)
    assert response.status_code == 400
    assert rule in response.json()["error"]["message"]


def test_a_text_model_answers_400_to_an_image(server):
    response = httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": _messages(data_url(image(1)))}, timeout=60)
    assert response.status_code == 400
    assert "does not take image input" in response.json()["error"]["message"]
    unknown = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [{"type": "input_audio", "text": "x"}]}]})
    assert unknown.status_code == 400 and "content parts are text" in unknown.json()["error"]["message"]


def test_a_model_that_takes_images_has_room_for_inline_photos(llava_server, server):
    """A 1400x1400 noise PNG is ~8 MB as a data: URL: past the default 4 MiB body limit, within the
    32 MiB a model that takes images gets; the text model's server still answers 413."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(3).rand(1400, 1400, 3) * 255).astype("uint8")).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert len(url) > 4 << 20
    body = {"model": "llava", "messages": _messages(url), "max_tokens": 4}
    assert httpx.post(llava_server[1].url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
    assert httpx.post(server.url + "/v1/chat/completions", json={**body, "model": None},
                      timeout=120).status_code == 413
