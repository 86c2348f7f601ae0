"""A request's choices as engine requests: one per prompt and per `n`, submitted together so they batch.

Choice i of prompt p has index p * n + i, as OpenAI numbers them. The n choices of one prompt share its
tokens (tokenized once) and differ in their seeds: a request's seed s gives choice k the seed s + k (mod 2^64),
so each is reproducible alone; without a seed each draws a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..engine.request import Request as Job
from .checks import RequestError

SEED_SPACE = 2**64  # numpy's PCG64 seeds from 64 bits


def choice_seed(seed: int | None, index: int) -> int | None:
    return None if seed is None else (seed + index) % SEED_SPACE


def make_jobs(service, req, emit_for: Callable[[int], Callable[[dict], None]]) -> tuple[list[Job], int, list[str]]:
    """(jobs by choice index, prompt tokens counted once per prompt, each choice's echoed prompt text or "").

    `service.make_job` tokenizes and checks each prompt (RequestError names the field); emit_for(index) is the
    callback of choice `index`. Tokenizing can take seconds: call this off the event loop."""
    prompts = req.prompts if not req.chat else [None]
    jobs: list[Job] = []
    echoes: list[str] = []
    prompt_tokens = 0
    for p, prompt in enumerate(prompts):
        first = service.make_job(replace(req, prompt=prompt, choice=p * req.n), emit_for(p * req.n))
        prompt_tokens += len(first.prompt_ids)
        jobs.append(first)
        for k in range(1, req.n):
            params = replace(first.params, seed=choice_seed(first.params.seed, k))
            jobs.append(first.sibling(params, emit_for(p * req.n + k)))  # same tokens, stops and limits
        echo = echo_text(service.tokenizer, prompt) if req.echo else ""
        echoes += [echo] * req.n
    return jobs, prompt_tokens, echoes


def echo_text(tokenizer, prompt: str | list[int]) -> str:
    """The prompt as the reply echoes it: the text sent, or the text of the token ids sent."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer is None:
        raise RequestError("'echo' needs the prompt's text, and this model carries no vocabulary; leave 'echo' "
                           "out", "echo")
    return tokenizer.decode(prompt)


def submit_all(engine, jobs: list[Job]) -> None:
    """Queue every job or none: a refusal (queue full, shutting down, unknown class) cancels those queued."""
    for i, job in enumerate(jobs):
        try:
            engine.submit(job)
        except Exception:
            for queued in jobs[:i]:
                engine.cancel(queued)
            raise
