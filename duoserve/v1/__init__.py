"""Generated gRPC stubs of the duoserve.v1 API; do not edit them.

Regenerate after changing protos/duoserve/v1/*.proto with `python scripts/gen_protos.py`.
"""
