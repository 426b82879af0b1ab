"""The grammar compiler under hostile specs: refused before compiling, killed at the deadline,
memory given back, cheap specs never queued behind slow ones, json_object from the disk cache."""
import os
import threading
import time

import pytest

from asyncllm.errors import EngineOverloadedError
from asyncllm.sampling.grammar_compiler import GrammarCompiler
from asyncllm.sampling.regex_cost import regex_cost
from asyncllm.sampling.structured import GrammarError, StructuredLimits, StructuredOutputs

# A DFA blow-up: a short regex whose automaton needs 2^200 states; it never finishes compiling.
# It looks cheap (202 positions), so it starts in the regex lane; the 1100-copy one goes straight
# to the heavy lane.
EXPLODING = "(a|b)*a(a|b){200}"
EXPLODING_HEAVY = "(a|b)*a(a|b){1100}"


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from asyncllm.model.tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(default_gguf)


@pytest.fixture
def compiler(tokenizer, tmp_path):
    gc = GrammarCompiler(tokenizer, StructuredLimits(compile_timeout_s=2.0), cache_dir=tmp_path)
    yield gc
    gc.shutdown()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_regex_cost_counts_spelt_out_repetitions():
    assert regex_cost("[a-z]{1,60000}").wide_positions == 60000
    assert regex_cost("(ab){10}").positions == 20 and regex_cost("(ab){10}").wide_positions == 0
    assert regex_cost("((x{10}){10}){10}").positions == 1000
    assert regex_cost("a*b+").positions == 2
    assert regex_cost("[^\"]{0,200}").wide_positions == 200
    assert regex_cost("(yes|no)").positions == 5


def test_deep_nesting_is_refused_whatever_the_recursion_limit():
    import sys

    from asyncllm.sampling.regex_cost import MAX_NESTING, RegexTooComplex, nesting_depth

    assert nesting_depth(r"(a(b)c)[(((]\((x)") == 2
    assert regex_cost("(" * MAX_NESTING + "a" + ")" * MAX_NESTING).positions == 1
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)  # torch's compiler raises it; the answer must not change
    try:
        with pytest.raises(RegexTooComplex, match="nests too deeply"):
            regex_cost("(" * 3000 + "a" + ")" * 3000)
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("spec,message", [
    (StructuredOutputs(regex="[a-z]{1,60000}"), "grammar_max_positions"),
    (StructuredOutputs(regex="b{1000}" * 6), "grammar_max_positions"),
    (StructuredOutputs(regex="[a-z]{1,1000}"), "grammar_max_wide_positions"),
    (StructuredOutputs(json={"type": "string", "maxLength": 5000}), "grammar_max_positions"),
    (StructuredOutputs(json={"type": "object", "properties": {"s": {"type": "string", "maxLength": 400}}}),
     "grammar_max_wide_positions"),
    (StructuredOutputs(regex="(" * 3000 + "a" + ")" * 3000), "nests too deeply"),
    (StructuredOutputs(choice=[f"a long option number {i:05d} of many" for i in range(1000)]),
     "grammar_max_positions"),
])
def test_costly_specs_are_refused_before_compiling(compiler, spec, message):
    # CPU time of this thread, not wall time: a loaded CI machine must not fail it, and a
    # compile (seconds of CPU) could not hide in it.
    started = time.thread_time()
    with pytest.raises(GrammarError, match=message):
        compiler.submit(spec)
    assert time.thread_time() - started < 0.5
    assert compiler.worker_pids() == []  # nothing was started, let alone compiled


def test_a_compile_past_its_deadline_is_killed_and_cheap_specs_keep_flowing(compiler):
    seen: set[int] = set()  # every compile process alive while the blocker runs (some live < 1 s)
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.update(compiler.worker_pids())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        blocker = compiler.submit(StructuredOutputs(regex=EXPLODING))
        time.sleep(1.2)  # past the light lane's budget: it moves to the heavy lane
        # Meanwhile cheap specs compile at once in the light lane.
        for i in range(5):
            started = time.monotonic()
            compiler.submit(StructuredOutputs(choice=["yes", "no", f"maybe {i}"])).future.result(timeout=5)
            assert time.monotonic() - started < 0.1
        with pytest.raises(GrammarError, match="longer than the limit"):
            blocker.future.result(timeout=10)
        deadline = time.monotonic() + 5  # the lane's thread kills it as its own wait ends (later under load)
        while not seen - set(compiler.worker_pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        done.set()
        watcher.join()
    killed = seen - set(compiler.worker_pids())
    assert killed and not any(_alive(pid) for pid in killed)  # the process and its memory are gone
    # The same spec again is refused from memory, without compiling for another 2 s.
    started = time.monotonic()
    with pytest.raises(GrammarError):
        compiler.submit(StructuredOutputs(regex=EXPLODING)).future.result(timeout=5)
    assert time.monotonic() - started < 0.1


def test_slow_specs_holding_every_heavy_worker_do_not_starve_choice(tokenizer, tmp_path):
    gc = GrammarCompiler(tokenizer, StructuredLimits(compile_timeout_s=3.0, compile_workers=2, max_queued_compiles=2),
                         cache_dir=tmp_path)
    try:
        slow = [gc.submit(StructuredOutputs(regex=EXPLODING_HEAVY + "x" * i)) for i in range(2)]
        with pytest.raises(EngineOverloadedError):  # the heavy lane is full: 429, not a queue behind them
            gc.submit(StructuredOutputs(regex=EXPLODING_HEAVY + "yy"))
        # Slow regexes that look cheap hold the regex lane too; choices and schemas have their own.
        clogging = [gc.submit(StructuredOutputs(regex=EXPLODING + "z" * i)) for i in range(3)]
        # Starved would mean waiting out the 3 s compile timeout of the clogging specs; the bounds
        # below leave room for a busy 2-core machine (a schema once took 0.62 s there under load).
        started = time.monotonic()
        gc.submit(StructuredOutputs(choice=["yes", "no"])).future.result(timeout=5)
        assert time.monotonic() - started < 0.5
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                  "required": ["name", "age"]}
        started = time.monotonic()
        gc.submit(StructuredOutputs(json=schema)).future.result(timeout=5)
        assert time.monotonic() - started < 1.5
        for c in slow + clogging:
            with pytest.raises((GrammarError, EngineOverloadedError)):
                c.future.result(timeout=10)
    finally:
        gc.shutdown()


def test_a_compile_over_the_memory_cap_fails_cleanly(tokenizer, tmp_path):
    limits = StructuredLimits(worker_memory_bytes=400 << 20, max_wide_positions=4000, max_positions=20000,
                              compile_timeout_s=30)
    gc = GrammarCompiler(tokenizer, limits, cache_dir=tmp_path)
    try:
        with pytest.raises(GrammarError, match="memory limit"):
            gc.submit(StructuredOutputs(regex="[a-z]{1,3000}")).future.result(timeout=60)
        gc.submit(StructuredOutputs(choice=["still", "works"])).future.result(timeout=5)
    finally:
        gc.shutdown()


def test_rejected_hostile_specs_leave_memory_as_it_was(compiler):
    compiler.submit(StructuredOutputs(choice=["warm"])).future.result(timeout=10)
    before = _rss_mb()
    hostile = ["[a-z]{1,60000}", "(a|aa)*b{100000}", "[a-z]{1,1000}", EXPLODING, EXPLODING + "c",
               "(.{1,50}){1,50}", "[a-z]{1,3000}", "x{1,9999}", EXPLODING + "d", "(\\w{200}){200}"]
    for regex in hostile:
        try:
            compiler.submit(StructuredOutputs(regex=regex)).future.result(timeout=10)
        except GrammarError:
            continue
        raise AssertionError(f"{regex} was accepted")
    assert _rss_mb() - before < 100


def test_json_object_comes_from_the_warm_up_and_the_disk_cache(tokenizer):
    first = GrammarCompiler(tokenizer)  # the default cache dir, which every engine warms
    try:
        first.warm_up().result(timeout=300)
    finally:
        first.shutdown()
    second = GrammarCompiler(tokenizer)
    try:
        second.start()  # what an engine does at start (structured_outputs_warmup): the vocabulary, the workers
        started = time.monotonic()
        second.submit(StructuredOutputs(json_object=True)).future.result(timeout=300)
        assert time.monotonic() - started < 0.5
    finally:
        second.shutdown()


def test_shutdown_stops_every_worker(tokenizer, tmp_path):
    gc = GrammarCompiler(tokenizer, StructuredLimits(compile_timeout_s=5), cache_dir=tmp_path)
    running = gc.submit(StructuredOutputs(regex=EXPLODING))
    gc.submit(StructuredOutputs(choice=["a", "b"])).future.result(timeout=5)
    time.sleep(0.7)
    pids = gc.worker_pids()
    assert pids
    done = threading.Event()
    threading.Thread(target=lambda: (gc.shutdown(), done.set()), daemon=True).start()
    assert done.wait(5)
    assert not any(_alive(pid) for pid in pids)
    assert running.future.done() or not running.future.running()
