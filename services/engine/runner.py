"""Model runner: turns a `SchedulerOutput` (block ids, token ids) into tensors and runs the model.

The only engine piece that builds tensors from scheduling decisions. Returns the logits of the
requests that sample this iteration, in `SchedulerOutput.chunks` order. Tensors are built on the
host and moved once per iteration to the KV pool's device (a no-op on CPU).
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from services.engine.attention import AttentionMetadata, PrefillSeq
from services.engine.blocks import blocks_for_tokens
from services.engine.model import LlamaModel
from services.engine.scheduler import ScheduledChunk, SchedulerOutput


class ModelRunner:
    """Runs one iteration of the model over the shared KV pool."""

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache          # [L, 2, N, Hkv, block_size, D]
        self.block_size = block_size
        self.device = kv_cache.device
        self.last_forward_s = 0.0         # the last run's forward pass and logits, without building inputs

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> torch.Tensor:
        """-> logits [S, V] float32 for the chunks with is_sampled, in batch order."""
        input_ids, positions, meta, sample_rows = self.prepare(batch)
        started = time.perf_counter()
        hidden = self.model.forward(input_ids, positions, meta, self.kv_cache)  # [T, hidden]
        logits = self.model.compute_logits(hidden[sample_rows])
        self.last_forward_s = time.perf_counter() - started   # cuda: launch time only (the sampler syncs)
        return logits

    def prepare(self, batch: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        prefills: list[PrefillSeq] = []
        for chunk in batch.chunks:
            start = len(token_ids)
            token_ids.extend(chunk.token_ids)
            span = range(chunk.start_position, chunk.context_len)
            positions.extend(span)
            slots.extend(chunk.block_ids[p // bs] * bs + p % bs for p in span)
            if chunk.is_sampled:
                sample_rows.append(len(token_ids) - 1)
            if len(prefills) < len(batch.prefill_chunks):
                prefills.append(PrefillSeq(start, len(chunk.token_ids), chunk.context_len,
                                           torch.tensor(self._table(chunk), dtype=torch.int64)))
        tables, mask = self._decode_tables(batch.decode_chunks)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            prefills=tuple(prefills),
            num_prefill_tokens=batch.num_prefill_tokens,
            decode_block_tables=tables,
            decode_mask=mask,
            decode_context_lens=torch.tensor([c.context_len for c in batch.decode_chunks], dtype=torch.int32),
        )
        ids, pos = torch.tensor(token_ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64)
        rows = torch.tensor(sample_rows, dtype=torch.int64)
        if self.device.type == "cpu":
            return ids, pos, meta, rows
        return ids.to(self.device), pos.to(self.device), self._to_device(meta), rows.to(self.device)

    def _to_device(self, meta: AttentionMetadata) -> AttentionMetadata:
        prefills = tuple(replace(p, block_table=p.block_table.to(self.device)) for p in meta.prefills)
        return replace(meta, slot_mapping=meta.slot_mapping.to(self.device), prefills=prefills,
                       decode_block_tables=meta.decode_block_tables.to(self.device),
                       decode_mask=meta.decode_mask.to(self.device),
                       decode_context_lens=meta.decode_context_lens.to(self.device))

    def _table(self, chunk: ScheduledChunk) -> tuple[int, ...]:
        return chunk.block_ids[: blocks_for_tokens(chunk.context_len, self.block_size)]

    def _decode_tables(self, chunks: tuple[ScheduledChunk, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables padded to the longest row, and which key slots are real. -> [B, M], [B, 1, 1, M*bs]."""
        if not chunks:
            return torch.zeros((0, 1), dtype=torch.int64), torch.zeros((0, 1, 1, self.block_size), dtype=torch.bool)
        tables = [self._table(c) for c in chunks]
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + (0,) * (width - len(t)) for t in tables], dtype=torch.int64)
        context_lens = torch.tensor([c.context_len for c in chunks]).view(-1, 1)
        mask = torch.arange(width * self.block_size).view(1, -1) < context_lens
        return padded, mask.view(len(chunks), 1, 1, -1)
