"""LlamaIndex chat (sync streaming and native async) on the in-process engine.

    python examples/llamaindex_chat.py [max_tokens]
"""
import asyncio
import sys

from llama_index.core.llms import ChatMessage

from asyncllm import AsyncEngine
from llama_index.llms.asyncllm import AsyncLLM

max_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 64
engine = AsyncEngine.from_args()
llm = AsyncLLM(engine=engine, max_tokens=max_tokens, temperature=0)
messages = [ChatMessage(role="user", content="Name two planets.")]
for response in llm.stream_chat(messages):
    print(response.delta, end="", flush=True)
print()
print("async:", asyncio.run(llm.achat(messages)).message.content)
engine.shutdown()
