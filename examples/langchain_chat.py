"""A LangChain chain (prompt template | chat model) streaming from the in-process engine.

    python examples/langchain_chat.py [max_tokens]
"""
import sys

from langchain_core.prompts import ChatPromptTemplate

from asyncllm import AsyncEngine
from langchain_asyncllm import ChatAsyncLLM

max_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 64
engine = AsyncEngine.from_args()
model = ChatAsyncLLM(engine=engine, max_tokens=max_tokens, temperature=0)
prompt = ChatPromptTemplate.from_messages([("system", "You answer in one sentence."), ("user", "What is {topic}?")])
chain = prompt | model
for chunk in chain.stream({"topic": "photosynthesis"}):
    print(chunk.content, end="", flush=True)
print()
engine.shutdown()
