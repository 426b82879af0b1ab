"""Beam search, as vLLM V1 runs it on its engine and as transformers scores it.

Each step sends every running beam of every prompt to the engine as one request of one token
with its top-K logprobs (K = 2 x beam_width, transformers' candidate count with one EOS id); a
beam's prompt and the blocks it shares with its siblings come from the prefix cache, so a step
computes only each beam's last, partial block. The selection between steps is transformers'
`_beam_search` (5.x) step for step, so that the same weights give the same beams and scores:

- the K best continuations over all running beams by accumulated logprob;
- those that end (an EOS token, or the length limit) among the first `beam_width` become
  finished hypotheses scored `logprob_sum / generated_len ** length_penalty` (the EOS counted);
  the best `beam_width` hypotheses are kept;
- the best `beam_width` that do not end run on;
- the search stops when every running beam's best possible score (`early_stopping=False`'s
  heuristic: its sum over the current length) cannot beat the worst kept hypothesis, or at the
  length limit.

`BeamSearch` is that selection alone (no engine). `engine_beam_search` builds the
`BeamSearchBatch` that `LLM.beam_search`, `AsyncEngine.beam_search` and the server drive:
`while batch.pending(): batch.advance(<the engine's outputs for batch.pending()>)`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from asyncllm.errors import InvalidRequestError

_NEG_INF = -1.0e9  # transformers' "impossible" score


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's `BeamSearchParams`. Deterministic: temperature 0 only."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # accepted as vLLM's; EOS text is never included

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer", param=name)
        if self.temperature != 0.0:
            raise InvalidRequestError("beam search here is deterministic: temperature must be 0", "temperature")


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + generated tokens (the EOS that ended it included)
    logprobs: list[float]  # of each generated token
    cum_logprob: float
    num_prompt_tokens: int
    score: float = _NEG_INF  # cum_logprob / generated_len ** length_penalty, once finished
    text: str = ""  # the generated text (without the EOS)
    finish_reason: str = "length"  # "stop" when it ended with EOS

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence] = field(default_factory=list)  # best first


def candidates_per_beam(beam_width: int, eos_token_ids: frozenset[int]) -> int:
    """transformers' count of continuations kept per step (it counts the configured EOS ids, ignore_eos or
    not): every beam is asked for this many best logprobs."""
    return max(2, 1 + max(1, len(eos_token_ids))) * beam_width


class BeamSearch:
    """The search of one prompt; `candidates_per_beam` logprobs are asked of every running beam."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: frozenset[int]):
        self.params = params
        self.eos = frozenset() if params.ignore_eos else eos_token_ids
        self.prompt_len = len(prompt_token_ids)
        self.max_len = self.prompt_len + params.max_tokens
        self.candidates_per_beam = candidates_per_beam(params.beam_width, eos_token_ids)
        self.running = [BeamSearchSequence(list(prompt_token_ids), [], 0.0, self.prompt_len)]
        self.finished: list[BeamSearchSequence] = []
        self.improvable = True
        self.done = False

    def step(self, top_logprobs: list[dict[int, float]]) -> None:
        """Advances by one token, given the top logprobs of each running beam (in order)."""
        params, width = self.params, self.params.beam_width
        cur_len = len(self.running[0].tokens)
        options = [(beam.cum_logprob + lp, i, token) for i, beam in enumerate(self.running)
                   for token, lp in top_logprobs[i].items()]
        options.sort(key=lambda o: -o[0])
        options = options[:self.candidates_per_beam]
        at_limit = cur_len + 1 >= self.max_len
        next_running: list[BeamSearchSequence] = []
        new_finished: list[BeamSearchSequence] = []
        for rank, (total, i, token) in enumerate(options):
            parent = self.running[i]
            child = BeamSearchSequence(parent.tokens + [token], parent.logprobs + [total - parent.cum_logprob], total,
                                       self.prompt_len)
            if at_limit or token in self.eos:
                if rank < width and self.improvable:
                    child.score = total / ((cur_len + 1 - self.prompt_len) ** params.length_penalty)
                    child.finish_reason = "stop" if token in self.eos else "length"
                    new_finished.append(child)
            elif len(next_running) < width:
                next_running.append(child)
        self.finished = sorted(self.finished + new_finished, key=lambda s: -s.score)[:width]
        self.running = next_running
        # transformers' early_stopping=False heuristic, after the step.
        if self.improvable and self.running:
            best = self.running[0].cum_logprob / ((cur_len + 1 - self.prompt_len) ** params.length_penalty)
            worst = self.finished[-1].score if len(self.finished) == width else _NEG_INF
            self.improvable = best > worst
        self.done = not self.running or not self.improvable

    def output(self, decode: Callable[[list[int]], str], num_sequences: int) -> BeamSearchOutput:
        best = self.finished if self.finished else self.running  # (max_tokens always finishes some)
        for seq in best:
            generated = seq.output_token_ids
            if generated and generated[-1] in self.eos:
                generated = generated[:-1]
            seq.text = decode(generated)
        return BeamSearchOutput(best[:num_sequences])


class BeamSearchBatch:
    """Several prompts' searches, their running beams sent to the engine together each step as
    one-token requests with `step_params`; see `engine_beam_search`."""

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams, eos_token_ids: frozenset[int],
                 step_params, decode: Callable[[list[int]], str]):
        self.params = params
        self.step_params = step_params
        self._decode = decode
        self.searches = [BeamSearch(p, params, eos_token_ids) for p in prompts]

    def pending(self) -> list[list[int]]:
        """The token sequences whose top logprobs the next step needs (empty: done)."""
        return [beam.tokens for s in self.searches if not s.done for beam in s.running]

    def advance(self, outputs: list) -> None:
        """Takes the finished one-token RequestOutputs of `pending()`, in order."""
        k = self.step_params.logprobs
        offset = 0
        for s in [s for s in self.searches if not s.done]:
            n = len(s.running)
            s.step([top_logprobs(out, k) for out in outputs[offset:offset + n]])
            offset += n

    def outputs(self, num_sequences: int | None = None) -> list[BeamSearchOutput]:
        return [s.output(self._decode, num_sequences or self.params.beam_width) for s in self.searches]


def engine_beam_search(engine, prompts: list[list[int]], params: BeamSearchParams) -> BeamSearchBatch:
    """The batch of these prompts' searches on an LLMEngine: its EOS ids and detokenizer, and the
    SamplingParams of one beam's step (one token, its K best logprobs); refuses what cannot run."""
    from asyncllm.sampling_params import RequestOutputKind, SamplingParams

    eos = frozenset(engine.eos_token_ids)
    k = candidates_per_beam(params.beam_width, eos)
    if k > engine.config.limits.max_logprobs:
        raise InvalidRequestError(f"beam_width {params.beam_width} needs the {k} best logprobs of each beam; this "
                                  f"engine's max_logprobs is {engine.config.limits.max_logprobs}", param="beam_width")
    longest_prompt = max(len(p) for p in prompts)
    if longest_prompt + params.max_tokens > engine.max_model_len:
        raise InvalidRequestError(f"prompt ({longest_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds "
                                  f"max_model_len ({engine.max_model_len})", param="max_tokens")
    step_params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, ignore_eos=True,
                                 output_kind=RequestOutputKind.FINAL_ONLY)
    return BeamSearchBatch(prompts, params, eos, step_params,
                           lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True))


def top_logprobs(output, k: int) -> dict[int, float]:
    """A one-token RequestOutput → {token: logprob} of its k most likely next tokens."""
    position = output.outputs[0].logprobs[0]
    return {token: lp.logprob for token, lp in position.items() if lp.rank is not None and lp.rank <= k}
