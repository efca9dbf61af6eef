"""The in-process engine: scheduler, model runner and sampler over one KV pool.

A request's life here:
  added      tokenized prompt queued in the scheduler (RequestTooLarge if it can never fit)
  running    prompt fed in chunks, then one token per step; text detokenized incrementally
  finished   EOS, stop token, stop string, max_tokens, context full or abort: blocks freed at once

`step()` is schedule -> run -> sample -> postprocess. The offline CLI, the benchmarks and the
colocated worker use this class; the prefill and decode workers drive the same pieces themselves.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.engine.blocks import BlockManager
from services.engine.kv_cache import KVCacheSpec, allocate_kv_pool
from services.engine.loader import load_engine_weights, resolve_model_dir
from services.engine.model import LlamaModel
from services.engine.model_config import ModelConfig
from services.engine.output import OutputState, RequestOutput, make_output
from services.engine.runner import ModelRunner
from services.engine.sampler import Sampler, SamplingRow
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig, SchedulerMode, SchedulerOutput
from services.engine.sequence import FinishReason, Sequence, SequenceStatus
from services.engine.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to build an in-process engine."""

    model: str | None = None                 # HF checkpoint dir, a .gguf file, or None for the default model
    cache_dir: Path = Path.home() / ".cache" / "duoserve" / "models"   # converted checkpoints live here
    dtype: str = "float32"                   # float32 on the CPU; bfloat16/float16 where supported
    num_threads: int | None = None           # torch intra-op threads; None leaves torch's default
    block_size: int = 16
    num_kv_blocks: int | None = None         # overrides kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 512 << 20
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    chunk_size: int = 2048                   # prompt tokens per iteration (hybrid chunked prefill)
    max_model_len: int | None = None         # defaults to the model's context
    seed: int = 0                            # sampler seed for requests without their own
    device: str = "cpu"                      # "cuda": weights and KV pool on the GPU, Triton attention kernels
    prefix_caching: bool = True              # reuse the KV of prompts' cached prefixes (vLLM's default too)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def sample_batch(sampler: Sampler, scheduler: Scheduler, batch: SchedulerOutput,
                 logits: torch.Tensor) -> dict[str, int]:
    """One token for each chunk that reached its end. logits [S, V], rows in batch order.

    A request that asked for logprobs gets the new token's appended to its Sequence.logprobs."""
    sampled_chunks = [c for c in batch.chunks if c.is_sampled]
    seqs = [scheduler.get(c.request_id) for c in sampled_chunks]
    eos = scheduler.config.eos_token_ids
    rows = [_row(seq, eos) for seq in seqs]
    out = sampler.sample(logits, rows)
    for seq, logprob in zip(seqs, out.logprobs):
        if logprob is not None:
            seq.logprobs.append(logprob)
    return {c.request_id: token for c, token in zip(sampled_chunks, out.token_ids)}


def _row(seq: Sequence, eos_token_ids: tuple[int, ...]) -> SamplingRow:
    """The sampler's view of a request; its tokens only when a penalty or min_tokens reads them."""
    params = seq.params
    if params.has_penalties or params.min_tokens:
        return SamplingRow(params, len(seq.output_token_ids), seq.prompt_token_ids, seq.output_token_ids,
                           eos_token_ids)
    return SamplingRow(params, len(seq.output_token_ids))


@dataclass
class _Request:
    seq: Sequence
    output: OutputState
    num_reported: int = 0                     # completion tokens already returned by step()
    first_token_time: float | None = None


@dataclass
class LLMEngine:
    """Scheduler + runner + sampler + tokenizer for one model."""

    model_config: ModelConfig
    tokenizer: Tokenizer
    scheduler: Scheduler
    runner: ModelRunner
    sampler: Sampler
    requests: dict[str, _Request] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        model_dir = resolve_model_dir(config.model, config.cache_dir)
        model_config = ModelConfig.from_dir(model_dir)
        dtype = DTYPES[config.dtype]
        weights = {name: t.to(config.device) for name, t in load_engine_weights(model_dir, model_config, dtype).items()}
        spec = KVCacheSpec.for_model(model_config, config.block_size, dtype,
                                     config.num_kv_blocks, config.kv_cache_memory_bytes)
        tokenizer = Tokenizer.from_dir(model_dir)
        sched_config = SchedulerConfig(
            mode=SchedulerMode.HYBRID, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, chunk_size=config.chunk_size,
            max_model_len=min(config.max_model_len or model_config.max_position, model_config.max_position),
            eos_token_ids=tuple(dict.fromkeys((*model_config.eos_token_ids, *tokenizer.eos_token_ids))),
            prefix_caching=config.prefix_caching)
        return cls(
            model_config=model_config,
            tokenizer=tokenizer,
            scheduler=Scheduler(sched_config, BlockManager(spec.num_blocks)),
            runner=ModelRunner(LlamaModel(model_config, weights), allocate_kv_pool(spec, config.device),
                                config.block_size),
            sampler=Sampler(config.seed),
        )

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        seq = Sequence(request_id, list(prompt_token_ids), params, arrival_time=time.monotonic())
        self.scheduler.add(seq)
        detok = self.tokenizer.detokenizer(prompt_token_ids)
        self.requests[request_id] = _Request(seq, OutputState(params, detok))
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed now."""
        self.scheduler.finish(request_id, FinishReason.CANCELLED)
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()                       # pure: which requests, which blocks
        if batch.is_empty:
            return []
        logits = self.runner.run(batch)                         # torch: tensors from block ids, forward
        sampled = self.sample(batch, logits)
        advanced = self.scheduler.postprocess(batch, sampled)
        return [self._report(seq) for seq in advanced]

    def sample(self, batch: SchedulerOutput, logits: torch.Tensor) -> dict[str, int]:
        return sample_batch(self.sampler, self.scheduler, batch, logits)

    def _report(self, seq: Sequence) -> RequestOutput:
        req = self.requests[seq.request_id]
        new_ids = seq.output_token_ids[req.num_reported:]
        req.num_reported = len(seq.output_token_ids)
        for token in new_ids:
            is_special_stop = token in self.scheduler.config.eos_token_ids or token in seq.params.stop_token_ids
            req.output.push(token, is_special_stop and seq.status is SequenceStatus.FINISHED)
        if req.output.hit_stop_string and seq.status is not SequenceStatus.FINISHED:
            self.scheduler.finish(seq.request_id, FinishReason.STOP)
        out = make_output(seq.request_id, req.output, new_ids, seq.output_token_ids,
                          len(seq.prompt_token_ids), seq.finish_reason, seq.logprobs)
        if out.is_finished:
            del self.requests[seq.request_id]
        return out

    # ------------------------------------------------------------------ offline use
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run prompts (token ids) to completion, batched; outputs in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.is_finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]
