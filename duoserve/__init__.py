"""duoserve: the client SDK of an LLM server that runs prefill and decode side by side on one GPU.

    from duoserve import Client
    with Client("localhost:50051") as client:
        print(client.generate("Hello", max_tokens=16).text)

Importing duoserve loads grpc and protobuf only: no torch, no transformers.
"""
from duoserve import errors
from duoserve.client import AsyncClient, Chunk, Client, Completion, Usage

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Chunk", "Client", "Completion", "Usage", "errors", "__version__"]
