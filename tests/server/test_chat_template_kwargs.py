"""`chat_template_kwargs` reach the Jinja template, as Qwen3's `enable_thinking: false` needs: a
Qwen3-style template (an empty think block after the assistant header when thinking is off) set
with `--chat-template`, driven through `LLM.chat` and through the server with the real openai
client."""
import openai
import pytest

from asyncllm import LLM, AsyncEngine, SamplingParams
from asyncllm.server import build_app
from server_helpers import RunningServer

QWEN3_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
ASK = [{"role": "user", "content": "Say hi."}]
GREEDY = SamplingParams(max_tokens=2, temperature=0.0)


@pytest.fixture(scope="module")
def template_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "qwen3_style.jinja"
    path.write_text(QWEN3_STYLE)
    return str(path)


def test_llm_chat_passes_enable_thinking_to_the_template(template_path):
    llm = LLM(dtype="float32", chat_template=template_path, max_num_seqs=4)
    off = llm.chat(ASK, GREEDY, chat_template_kwargs={"enable_thinking": False})[0]
    on = llm.chat(ASK, GREEDY, chat_template_kwargs={"enable_thinking": True})[0]
    unset = llm.chat(ASK, GREEDY)[0]
    assert off.prompt.endswith(EMPTY_THINK)
    assert on.prompt.endswith("<|im_start|>assistant\n") and "<think>" not in on.prompt
    assert unset.prompt == on.prompt
    assert len(off.prompt_token_ids) > len(on.prompt_token_ids)


def test_server_passes_chat_template_kwargs_to_the_template(template_path):
    engine = AsyncEngine.from_args(dtype="float32", chat_template=template_path, max_num_seqs=4)
    srv = RunningServer(build_app(engine, run_lifespan=False), lifespan="off")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")

        def prompt_tokens(enable_thinking):
            reply = client.chat.completions.create(
                model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=2, temperature=0.0,
                extra_body={"chat_template_kwargs": {"enable_thinking": enable_thinking}})
            return reply.usage.prompt_tokens

        off, on = prompt_tokens(False), prompt_tokens(True)
        expected_off = engine.tokenizer(
            engine.tokenizer.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=False),
            add_special_tokens=False).input_ids
    finally:
        srv.stop()
        engine.shutdown()
    assert off == len(expected_off)
    assert off > on
