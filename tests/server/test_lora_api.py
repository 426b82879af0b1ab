"""LoRA over HTTP with the real openai client: `--lora-modules` adapters selected by `model`,
listed in /v1/models with their parent, loaded and unloaded at run time behind the API key
with paths confined to the LoRA root, and an unload that fails only new requests."""
import asyncio
import os

import httpx
import openai
import pytest

import helpers
from asyncllm import LLM, AsyncEngine, LoRARequest, SamplingParams
from asyncllm.cli import build_parser, engine_args_from
from asyncllm.server import build_app
from server_helpers import RunningServer

KEY = "lora-test-key"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def lora_setup(tiny_models, tmp_path_factory):
    """A tiny Llama served with adapter a1 from the start and a2, a3 loadable from the root."""
    base = tiny_models("LlamaForCausalLM")
    root = tmp_path_factory.mktemp("lora_root")
    outside = tmp_path_factory.mktemp("elsewhere")
    for i, (name, folder) in enumerate([("a1", root), ("a2", root), ("a3", root), ("secret", outside)]):
        helpers.save_lora_adapter(helpers.load_hf(base), str(folder / name), 8, ["q_proj", "v_proj", "down_proj"],
                                  seed=20 + i, b_std=0.2)
    os.symlink(outside / "secret", root / "link")
    engine = AsyncEngine.from_args(model=base, dtype="float32", enable_lora=True, max_loras=2, max_num_seqs=8)
    app = build_app(engine, api_key=KEY, lora_modules=[f"a1={root / 'a1'}"], allow_runtime_lora_updating=True,
                    lora_root=str(root), run_lifespan=False)
    srv = RunningServer(app, lifespan="off")
    yield engine, srv, base, root, outside
    srv.stop()
    engine.shutdown()


def _post(srv, path, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=60)


def _references(base, root, max_tokens):
    """Greedy texts of PROMPT in-process: the base model and each adapter (the same folders)."""
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=3, kv_cache_memory=16 << 20)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    loras = [None] + [LoRARequest(n, i + 1, str(root / n)) for i, n in enumerate(["a1", "a2", "a3"])]
    outs = llm.generate([PROMPT] * 4, params, use_tqdm=False, lora_request=loras)
    return dict(zip(["base", "a1", "a2", "a3"], (o.outputs[0].text for o in outs)))


def test_two_adapters_and_the_base_model_concurrently(lora_setup):
    engine, srv, base, root, _ = lora_setup
    models = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY).models.list().data
    by_id = {m.id: m for m in models}
    base_name = engine.model_name
    assert by_id["a1"].parent == base_name and by_id["a1"].root == str(root / "a1")
    assert by_id[base_name].parent is None
    assert _post(srv, "/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": "a2"}).status_code == 200
    assert "a2" in {m.id for m in openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY).models.list().data}

    client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY)

    async def complete(model):
        reply = await client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                                extra_body={"ignore_eos": True})
        return reply.model, reply.choices[0].text

    async def run_all():
        try:
            return await asyncio.gather(*(complete(m) for m in [base_name, "a1", "a2", "a1", base_name, "a2"]))
        finally:
            await client.close()

    replies = asyncio.run(run_all())
    want = _references(base, root, 12)
    for (model, text), name in zip(replies, ["base", "a1", "a2", "a1", "base", "a2"]):
        assert model == (base_name if name == "base" else name)
        assert text == want[name], name
    assert len({want["base"], want["a1"], want["a2"]}) == 3  # each adapter changes the text

    chat = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY).chat.completions.create(
        model="a1", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert chat.model == "a1" and chat.choices[0].message.content is not None


def test_runtime_loading_is_confined_authenticated_and_checked(lora_setup):
    engine, srv, _, root, outside = lora_setup

    def refused(body, status, match, key=KEY, path="/v1/load_lora_adapter"):
        reply = _post(srv, path, body, key)
        assert reply.status_code == status, reply.text
        assert match in reply.json()["error"]["message"]

    refused({"lora_name": "x", "lora_path": "a3"}, 401, "", key=None)
    refused({"lora_name": "x", "lora_path": "../elsewhere/secret"}, 400, "'..'")
    refused({"lora_name": "x", "lora_path": "a3/../a3"}, 400, "'..'")
    refused({"lora_name": "x", "lora_path": str(outside / "secret")}, 400, "outside the server's LoRA root")
    refused({"lora_name": "x", "lora_path": "link"}, 400, "outside the server's LoRA root")  # a symlink out
    refused({"lora_name": "x", "lora_path": "missing"}, 400, "does not exist")
    refused({"lora_name": "a1", "lora_path": "a3"}, 400, "already loaded")
    refused({"lora_name": "x"}, 400, "lora_path")
    refused({"lora_name": "nobody"}, 404, "not loaded", path="/v1/unload_lora_adapter")
    assert "x" not in {lora.lora_name for lora in engine.list_loras()}
    # Loaded by absolute path inside the root: fine.
    assert _post(srv, "/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": str(root / "a3")}).status_code == 200
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)


def test_unloading_fails_only_new_requests(lora_setup):
    """A stream with a3 keeps going (and gives a3's text) after a3 is unloaded; new requests
    naming it get a 404."""
    engine, srv, base, root, _ = lora_setup
    if "a3" not in {lora.lora_name for lora in engine.list_loras()}:
        assert _post(srv, "/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": "a3"}).status_code == 200
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY)
    stream = client.completions.create(model="a3", prompt=PROMPT, max_tokens=300, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    pieces, finish = [], None
    for i, chunk in enumerate(stream):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
        if i == 0:
            assert _post(srv, "/v1/unload_lora_adapter", {"lora_name": "a3"}).status_code == 200
            assert engine.engine.has_unfinished_requests()  # unloaded mid-run
            with pytest.raises(openai.NotFoundError, match="does not exist"):
                client.completions.create(model="a3", prompt=PROMPT, max_tokens=2)
    assert finish == "length"
    assert "".join(pieces) == _references(base, root, 300)["a3"]
    assert "a3" not in {m.id for m in client.models.list().data}


def test_adapter_routes_need_the_switch_and_a_root(lora_setup):
    engine, _, _, root, _ = lora_setup
    plain = RunningServer(build_app(engine, run_lifespan=False), lifespan="off")
    try:
        assert httpx.post(plain.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a1"}).status_code \
            == 404
    finally:
        plain.stop()
    with pytest.raises(ValueError, match="needs --lora-root"):
        build_app(engine, allow_runtime_lora_updating=True, run_lifespan=False)
    with pytest.raises(ValueError, match="name=path"):
        build_app(engine, lora_modules=["a1"], run_lifespan=False)
    ns = build_parser().parse_args(["serve", "--enable-lora", "--max-loras", "4", "--lora-modules",
                                    f"a={root / 'a1'}", f"b={root / 'a2'}", "--allow-runtime-lora-updating",
                                    "--lora-root", str(root)])
    args = engine_args_from(ns)
    assert args.enable_lora and args.max_loras == 4 and ns.allow_runtime_lora_updating
    assert ns.lora_modules == [f"a={root / 'a1'}", f"b={root / 'a2'}"] and ns.lora_root == str(root)
