"""Server reflection as ghz and grpcurl use it: method symbols resolve to their service's file."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dsipam.v1 import ipam_pb2

ROOT = Path(__file__).resolve().parents[2]
GHZ_CONFIGS = sorted((ROOT / "bench" / "ghz").glob("*.json"))


@pytest.fixture
def reflect(server_proc) -> Iterator[reflection_pb2_grpc.ServerReflectionStub]:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server_proc.target) as channel:
        yield reflection_pb2_grpc.ServerReflectionStub(channel)


def ask(stub: reflection_pb2_grpc.ServerReflectionStub, **request: object) -> reflection_pb2.ServerReflectionResponse:
    """One request on the bidirectional reflection stream, as a client sends it."""
    responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10))
    assert len(responses) == 1
    return responses[0]


def files_of(response: reflection_pb2.ServerReflectionResponse) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    out = {}
    for raw in response.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        out[proto.name] = proto
    return out


def method_from_reflection(stub: reflection_pb2_grpc.ServerReflectionStub, symbol: str):  # type: ignore[no-untyped-def]
    """Does what ghz does: look the method symbol up, build the files into a fresh pool, find the method."""
    files = files_of(ask(stub, file_containing_symbol=symbol))
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        for dep in files[name].dependency:
            add(dep)
        pool.Add(files[name])
        added.add(name)

    for name in files:
        add(name)
    service, _, method = symbol.replace("/", ".").rpartition(".")
    return pool.FindServiceByName(service).methods_by_name[method]


@pytest.mark.parametrize("method", [m.name for m in ipam_pb2.DESCRIPTOR.services_by_name["IpamService"].methods])
def test_every_ipam_method_symbol_resolves_to_its_service_file(reflect, method: str) -> None:  # type: ignore[no-untyped-def]
    found = method_from_reflection(reflect, f"dsipam.v1.IpamService.{method}")
    want = ipam_pb2.DESCRIPTOR.services_by_name["IpamService"].methods_by_name[method]
    assert found.full_name == want.full_name
    assert found.input_type.full_name == want.input_type.full_name
    assert found.output_type.full_name == want.output_type.full_name


def test_method_symbol_answer_carries_the_imported_files(reflect) -> None:  # type: ignore[no-untyped-def]
    files = files_of(ask(reflect, file_containing_symbol="dsipam.v1.IpamService.Allocate"))
    assert "dsipam/v1/ipam.proto" in files
    for dep in files["dsipam/v1/ipam.proto"].dependency:
        assert dep in files, f"{dep} missing from the answer"


def test_health_check_method_symbol_resolves(reflect) -> None:  # type: ignore[no-untyped-def]
    method = method_from_reflection(reflect, "grpc.health.v1.Health.Check")
    assert method.output_type.full_name == "grpc.health.v1.HealthCheckResponse"


def test_enum_value_named_through_its_enum_resolves(reflect) -> None:  # type: ignore[no-untyped-def]
    files = files_of(ask(reflect, file_containing_symbol="dsipam.v1.IpFamily.IP_FAMILY_IPV4"))
    assert "dsipam/v1/ipam.proto" in files


@pytest.mark.parametrize(
    "symbol",
    ["dsipam.v1.IpamService.NoSuchMethod", "dsipam.v1.NoSuchService.Allocate", "dsipam.v1.IpFamily.NO_SUCH_VALUE"],
)
def test_unknown_symbols_are_not_found(reflect, symbol: str) -> None:  # type: ignore[no-untyped-def]
    response = ask(reflect, file_containing_symbol=symbol)
    assert response.WhichOneof("message_response") == "error_response"
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_services_and_types_still_resolve(reflect) -> None:  # type: ignore[no-untyped-def]
    listed = ask(reflect, list_services="*").list_services_response.service
    assert {"dsipam.v1.IpamService", "grpc.health.v1.Health"} <= {s.name for s in listed}
    for symbol in ("dsipam.v1.IpamService", "dsipam.v1.AllocateRequest"):
        assert "dsipam/v1/ipam.proto" in files_of(ask(reflect, file_containing_symbol=symbol))


@pytest.mark.skipif(not GHZ_CONFIGS, reason="bench/ghz has no configs")
@pytest.mark.parametrize("config", GHZ_CONFIGS, ids=[p.stem for p in GHZ_CONFIGS])
def test_ghz_config_calls_resolve_through_reflection_alone(reflect, config: Path) -> None:  # type: ignore[no-untyped-def]
    """What ghz does with the config and no --proto: resolve the call, then build the request from data."""
    cfg = json.loads(config.read_text())
    assert "proto" not in cfg and "protoset" not in cfg, "the configs rely on reflection"
    method = method_from_reflection(reflect, cfg["call"])
    assert method.full_name == cfg["call"].replace("/", ".")
    data = json.dumps(cfg.get("data", {}))
    data = data.replace("{{.RequestNumber}}", "17").replace("{{newUUID}}", str(uuid.uuid4()))
    assert "{{" not in data, "a template ghz does not know"
    request_class = message_factory.GetMessageClass(method.input_type)
    request = json_format.Parse(data, request_class())  # raises on a field the message does not have
    if "owner" in cfg.get("data", {}):
        assert "17" in request.owner or len(request.owner) > 36, "each request must get its own owner"
