"""The Triton kernels (`triton_attention`) equal the torch reference (`attention`): KV writes bit for bit,
attention within floating-point tolerance, on a ragged mixed batch with shuffled block tables.

On the CPU they run under Triton's interpreter. TRITON_INTERPRET=1 is read when a kernel is
decorated (when `triton_attention` is imported), so the checks run in a child interpreter whose
environment sets it: whatever this pytest process imported first cannot change the mode. The
interpreter does not check what only the GPU compiler does (tile sizes tl.dot accepts, dtype
rules), so a second child compiles every kernel for an H100 (sm_90, Triton's bundled ptxas; no
GPU needed). With a GPU the same checks run compiled, in process, and a last test generates
greedily on CUDA and compares tokens with the CPU engine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from services.engine.attention import AttentionMetadata, PrefillSeq, paged_attention, write_kv

ROOT = Path(__file__).resolve().parents[2]
BS, D, NUM_BLOCKS = 16, 64, 64
HEAD_CONFIGS = ((9, 3), (8, 2))             # (query heads, KV heads): SmolLM2's 3:1 groups, and 4:1
# (new tokens, context after them): a whole prompt, a chunk over a cached prefix, a chunk of two query tiles.
PREFILLS = ((5, 5), (20, 33), (70, 100))
DECODE_CONTEXTS = (1, 16, 17, 64, 65, 130)  # block edges and the kernel's 64-key steps, on both sides
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_batch(num_heads: int, num_kv_heads: int, dtype: torch.dtype, device: str, seed: int):
    """A flat batch (prefill chunks, then decode rows) over a pool of random values, tables shuffled.

    -> q [T, H, D], k, v [T, Hkv, D] (strided views of one qkv tensor, as the model passes them),
    k_cache, v_cache [N, Hkv, BS, D] (views into one pool), meta."""
    g = torch.Generator().manual_seed(seed)
    contexts = [c for _, c in PREFILLS] + list(DECODE_CONTEXTS)
    query_lens = [n for n, _ in PREFILLS] + [1] * len(DECODE_CONTEXTS)
    perm = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    tables, cursor = [], 0
    for ctx in contexts:
        count = -(-ctx // BS)
        tables.append(perm[cursor:cursor + count])
        cursor += count
    slots = [t[p // BS] * BS + p % BS for t, n, ctx in zip(tables, query_lens, contexts) for p in range(ctx - n, ctx)]
    num_tokens = sum(query_lens)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * D, generator=g).to(dtype)
    q = qkv[:, :num_heads * D].view(num_tokens, num_heads, D)
    k = qkv[:, num_heads * D:(num_heads + num_kv_heads) * D].view(num_tokens, num_kv_heads, D)
    v = qkv[:, (num_heads + num_kv_heads) * D:].view(num_tokens, num_kv_heads, D)
    # Every slot holds a value, unwritten ones included: a kernel reading a wrong slot reads noise.
    pool = torch.randn(2, NUM_BLOCKS, num_kv_heads, BS, D, generator=g).to(dtype)
    starts = [sum(query_lens[:i]) for i in range(len(PREFILLS))]
    prefills = tuple(PrefillSeq(st, n, ctx, torch.tensor(t, device=device))
                     for st, (n, ctx), t in zip(starts, PREFILLS, tables))
    decode_tables = tables[len(PREFILLS):]
    width = max(len(t) for t in decode_tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables])
    lens = torch.tensor(DECODE_CONTEXTS, dtype=torch.int32)
    mask = (torch.arange(width * BS).view(1, -1) < lens.view(-1, 1)).view(len(lens), 1, 1, -1)
    meta = AttentionMetadata(torch.tensor(slots, device=device), prefills, starts[-1] + PREFILLS[-1][0],
                             padded.to(device), mask.to(device), lens.to(device))
    return q.to(device), k.to(device), v.to(device), pool[0].to(device), pool[1].to(device), meta


def run_checks(device: str) -> None:
    """Every head configuration and dtype: write_kv, then attention over the mixed batch."""
    from services.engine import triton_attention

    for seed, (num_heads, num_kv_heads) in enumerate(HEAD_CONFIGS):
        for dtype, tol in TOLERANCE.items():
            q, k, v, k_cache, v_cache, meta = make_batch(num_heads, num_kv_heads, dtype, device, seed)
            ref_k, ref_v = k_cache.clone(), v_cache.clone()
            write_kv(ref_k, ref_v, k, v, meta.slot_mapping)
            triton_attention.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
            assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v), f"write_kv {dtype} {num_heads}/{num_kv_heads}"
            expected = paged_attention(q, k, v, k_cache, v_cache, meta, D ** -0.5)
            got = triton_attention.paged_attention(q, k, v, k_cache, v_cache, meta, D ** -0.5)
            torch.testing.assert_close(got, expected, atol=tol, rtol=tol,
                                       msg=lambda m: f"{dtype} {num_heads}/{num_kv_heads}: {m}")
            # Without the runner's lengths the kernel counts them from the mask: same answer.
            lens = triton_attention.decode_context_lens(replace(meta, decode_context_lens=None))
            assert lens.tolist() == list(DECODE_CONTEXTS)


def test_kernels_match_torch_reference_in_triton_interpreter():
    pytest.importorskip("triton", reason="triton is installed on Linux x86_64 only (the test extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "from tests.engine.test_triton_kernels import run_checks; run_checks('cpu')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def compile_for_h100() -> None:
    """Every kernel, every dtype, with the constexprs the wrappers pass for SmolLM2's shapes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from services.engine import triton_attention as ta

    tile = {"BLOCK_SIZE": BS, "HEAD_DIM": D, "BLOCK_D": D}
    for dt in ("fp32", "bf16", "fp16"):
        kernels = (
            (ta._write_kv_kernel, {"k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr"}, {"slots_ptr": "*i64"},
             {**tile, "NUM_KV_HEADS": 3, "BLOCK_H": 4}),
            (ta._decode_kernel, {"q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr"},
             {"tables_ptr": "*i64", "context_lens_ptr": "*i32", "scale": "fp32"},
             {**tile, "GROUP": 3, "BLOCK_G": ta.MIN_DOT_ROWS, "BLOCK_N": ta.DECODE_BLOCK_N, "UPCAST": False}),
            (ta._prefill_kernel, {"q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr"}, {"table_ptr": "*i64", "scale": "fp32"},
             {**tile, "GROUP": 3, "BLOCK_M": ta.PREFILL_BLOCK_M, "BLOCK_N": ta.PREFILL_BLOCK_N, "UPCAST": False}),
        )
        for kernel, data_ptrs, typed, consts in kernels:
            signature = {name: "constexpr" if name in consts else f"*{dt}" if name in data_ptrs else typed.get(name, "i32")
                         for name in kernel.arg_names}
            compiled = triton.compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", 90, 32))
            assert compiled.asm["cubin"], f"{kernel.__name__} {dt}: no cubin"


def test_kernels_compile_for_h100_without_a_gpu():
    pytest.importorskip("triton", reason="triton is installed on Linux x86_64 only (the test extra)")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = "from tests.engine.test_triton_kernels import compile_for_h100; compile_for_h100()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.gpu
def test_kernels_match_torch_reference_on_cuda():
    run_checks("cuda")


@pytest.mark.gpu
@pytest.mark.slow
def test_greedy_tokens_on_cuda_match_cpu(default_model_dir: Path):
    """The default model in float32: the CUDA engine (Triton kernels) generates the CPU engine's tokens."""
    from services.engine.kernels import kernels_for
    from services.engine.llm_engine import EngineConfig, LLMEngine
    from services.engine.sampling_params import SamplingParams
    from services.engine import triton_attention

    assert kernels_for(torch.device("cuda")) is triton_attention.KERNELS
    # Small token budget and chunks: prompts are fed in several chunks beside decode rows.
    config = EngineConfig(model=str(default_model_dir), num_kv_blocks=128, max_num_batched_tokens=64, chunk_size=48)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = {}
    for device in ("cpu", "cuda"):
        engine = LLMEngine.from_config(replace(config, device=device))
        tok = engine.tokenizer
        prompts = [tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
                   tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}]),
                   tok.encode("def fibonacci(n):"), tok.encode("The quick brown fox")]
        outputs[device] = [list(out.token_ids) for out in engine.generate(prompts, params)]
    assert outputs["cuda"] == outputs["cpu"]
