"""The public Generation service: converts protobuf to the frontend's types and back; nothing else.

Errors are raised as `services.gateway.errors` exceptions and mapped by `ErrorInterceptor`.
"""
from __future__ import annotations

from typing import AsyncIterator

from duoserve.reattach import REQUEST_ID_METADATA
from duoserve.v1 import generation_pb2 as pb
from duoserve.v1 import generation_pb2_grpc
from services.engine.sampling_params import InvalidSamplingParams, SamplingParams
from services.gateway.errors import InvalidInput
from services.gateway.frontend import Chunk, Frontend, GenerateInput

FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "cancelled": pb.FINISH_REASON_CANCELLED, "error": pb.FINISH_REASON_ERROR}
MODES = {"split": pb.SERVING_MODE_SPLIT, "colocated": pb.SERVING_MODE_COLOCATED}


def to_sampling_params(sp: pb.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """Unset fields take the server's defaults; out-of-range ones raise InvalidInput naming the field."""
    try:
        return SamplingParams(
            max_tokens=sp.max_tokens if sp.HasField("max_tokens") else default_max_tokens,
            temperature=sp.temperature if sp.HasField("temperature") else 1.0,
            top_p=sp.top_p if sp.HasField("top_p") else 1.0,
            top_k=sp.top_k if sp.HasField("top_k") else 0,
            seed=sp.seed if sp.HasField("seed") else None,
            stop=tuple(sp.stop), stop_token_ids=tuple(sp.stop_token_ids), ignore_eos=sp.ignore_eos,
            presence_penalty=sp.presence_penalty if sp.HasField("presence_penalty") else 0.0,
            frequency_penalty=sp.frequency_penalty if sp.HasField("frequency_penalty") else 0.0,
            repetition_penalty=sp.repetition_penalty if sp.HasField("repetition_penalty") else 1.0,
            min_tokens=sp.min_tokens if sp.HasField("min_tokens") else 0,
            logprobs=sp.logprobs if sp.HasField("logprobs") else None)
    except InvalidSamplingParams as e:
        raise InvalidInput(str(e)) from None


def to_generate_input(request: pb.GenerateRequest, default_max_tokens: int) -> GenerateInput:
    sampling = to_sampling_params(request.sampling, default_max_tokens)
    kind = request.WhichOneof("input")
    if kind == "messages":
        messages = tuple((m.role, m.content) for m in request.messages.messages)
        return GenerateInput(request.request_id, sampling, messages=messages)
    if kind == "token_ids":
        if not request.token_ids.ids:
            raise InvalidInput("token_ids: empty; give at least one token id")
        return GenerateInput(request.request_id, sampling, token_ids=tuple(request.token_ids.ids))
    return GenerateInput(request.request_id, sampling, prompt=request.prompt if kind == "prompt" else None)


def to_response(chunk: Chunk) -> pb.GenerateResponse:
    response = pb.GenerateResponse(request_id=chunk.request_id, token_ids=chunk.token_ids, text=chunk.text)
    if chunk.logprobs:
        response.logprobs.extend(
            pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
            for lp in chunk.logprobs)
    if chunk.finish_reason:
        response.finish_reason = FINISH_REASONS[chunk.finish_reason]
    if chunk.usage:
        u = chunk.usage
        response.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                         queue_time_ms=u.queue_time_ms, ttft_ms=u.ttft_ms, e2e_ms=u.e2e_ms,
                                         cached_prompt_tokens=u.cached_tokens))
    return response


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        req = to_generate_input(request, self.frontend.config.default_max_tokens)

        async def accepted(request_id: str) -> None:    # the client may re-attach from here on
            await context.send_initial_metadata(((REQUEST_ID_METADATA, request_id),))
        async for chunk in self.frontend.generate(req, accepted):
            yield to_response(chunk)

    async def Attach(self, request: pb.AttachRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        if not request.request_id:
            raise InvalidInput("request_id: empty; give the id of the request to re-attach to")
        async for chunk in self.frontend.attach(request.request_id, request.num_received_tokens):
            yield to_response(chunk)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        return pb.TokenizeResponse(token_ids=await self.frontend.tokenize(request.text))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        self.frontend._ready_tokenizer()
        info = self.frontend.info
        return pb.ModelInfo(model=info.name, architecture=info.architecture, vocab_size=info.vocab_size,
                            max_context=info.max_model_len,
                            max_tokens=min(self.frontend.config.max_tokens_limit, info.max_model_len - 1),
                            block_size=info.block_size, num_kv_blocks=info.num_kv_blocks, mode=MODES[info.mode])
