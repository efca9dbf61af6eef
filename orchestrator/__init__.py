"""Control plane: performance model, SLO policy (and, later, the controller, admin servicer and simulator).

`perf_model` and `policy` are pure Python (no torch, grpc, redis or numpy), so the orchestrator stays
light and the simulator can call them thousands of times per simulated second.
"""
