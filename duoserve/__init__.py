"""duoserve: the client SDK of an LLM server that runs prefill and decode side by side on one GPU.

    import duoserve
    with duoserve.Client("localhost:50051") as client:     # a target without a port means 50051
        reply = client.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0)
        print(reply.text)

Importing duoserve loads grpc and protobuf only: no torch, no transformers.
"""
from duoserve import errors
from duoserve.async_client import AsyncClient
from duoserve.client import Client
from duoserve.messages import Chunk, Completion, Usage

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Chunk", "Client", "Completion", "Usage", "errors", "__version__"]
