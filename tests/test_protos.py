"""The committed stubs match the protos, and the protos keep the shape and comments we rely on."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]


def load_gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_protos = load_gen_protos()


def test_committed_stubs_match_the_protos(tmp_path):
    fresh = gen_protos.generate(tmp_path)
    assert set(fresh) == {f"{name}{suffix}" for name in ("admin", "generation", "worker")
                          for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")}
    stale = gen_protos.differences(fresh, gen_protos.committed_stubs())
    assert not stale, (
        f"duoserve/v1 stubs differ from protos/ ({', '.join(stale)}): run "
        f"`python scripts/gen_protos.py` and commit the result (installed grpcio-tools "
        f"{importlib.metadata.version('grpcio-tools')})")


def test_check_mode_passes_on_the_committed_stubs():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_stubs_import_each_other_through_the_package():
    for name, source in gen_protos.committed_stubs().items():
        for line in source.splitlines():
            if "_pb2 " in line and "import" in line:
                assert line.startswith(("from duoserve.v1 import ", "from google.protobuf import ")), \
                    f"{name}: {line}"


def test_fix_imports_makes_bare_imports_package_imports():
    bare = "import grpc\nimport generation_pb2 as generation__pb2\n"
    assert gen_protos.fix_imports(bare) == (
        "import grpc\nfrom duoserve.v1 import generation_pb2 as generation__pb2\n")
    with pytest.raises(RuntimeError, match="outside duoserve.v1"):
        gen_protos.fix_imports("from elsewhere import other_pb2 as o\n")


def _descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path / "api.pb"
    protos = [str(p) for p in gen_protos.proto_files()]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{gen_protos.PROTO_ROOT}",
                    "--include_source_info", f"--descriptor_set_out={out}", *protos],
                   cwd=gen_protos.PROTO_ROOT, check=True)
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_every_message_field_enum_value_and_method_is_commented(tmp_path):
    # Paths in SourceCodeInfo (descriptor.proto): 4 = message_type, 2 = field, 3 = nested_type,
    # 5 = enum_type, 2 = enum value, 6 = service, 2 = method.
    missing = []
    for file in _descriptor_set(tmp_path).file:
        commented = {tuple(loc.path) for loc in file.source_code_info.location
                     if loc.leading_comments.strip() or loc.trailing_comments.strip()}

        def check_message(message, path, name):
            for i, field in enumerate(message.field):
                if (*path, 2, i) not in commented:
                    missing.append(f"{file.name}: {name}.{field.name}")
            for i, nested in enumerate(message.nested_type):
                check_message(nested, (*path, 3, i), f"{name}.{nested.name}")

        for i, message in enumerate(file.message_type):
            check_message(message, (4, i), message.name)
        for i, enum in enumerate(file.enum_type):
            for j, value in enumerate(enum.value):
                if (5, i, 2, j) not in commented and not value.name.endswith("_UNSPECIFIED"):
                    missing.append(f"{file.name}: {enum.name}.{value.name}")
        for i, service in enumerate(file.service):
            for j, method in enumerate(service.method):
                if (6, i, 2, j) not in commented:
                    missing.append(f"{file.name}: {service.name}.{method.name}")
    assert not missing, "uncommented: " + ", ".join(missing)


def test_generation_api_shape():
    from duoserve.v1 import generation_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Generation"]
    generate = service.methods_by_name["Generate"]
    assert generate.server_streaming and not generate.client_streaming
    assert {m.name for m in service.methods} == {"Generate", "Attach", "Tokenize", "GetModelInfo"}
    attach = service.methods_by_name["Attach"]
    assert attach.server_streaming and attach.output_type.name == "GenerateResponse"
    oneof = pb.GenerateRequest.DESCRIPTOR.oneofs_by_name["input"]
    assert [f.name for f in oneof.fields] == ["prompt", "messages", "token_ids"]
    sampling = pb.SamplingParams.DESCRIPTOR
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        assert sampling.fields_by_name[name].has_presence, f"{name} must tell unset from 0"
    assert [v.name for v in pb.FinishReason.DESCRIPTOR.values] == [
        "FINISH_REASON_UNSPECIFIED", "FINISH_REASON_STOP", "FINISH_REASON_LENGTH",
        "FINISH_REASON_CANCELLED", "FINISH_REASON_ERROR"]


def test_worker_api_shape():
    from duoserve.v1 import worker_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Worker"]
    assert {m.name for m in service.methods} == {"SetComputeShare", "GetStats", "Drain"}
    assert service.methods_by_name["SetComputeShare"].output_type.name == "ComputeShare"
    assert pb.SetComputeShareRequest.DESCRIPTOR.fields_by_name["token_budget"].has_presence
