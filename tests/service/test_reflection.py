"""Server reflection answers as v1 (grpcurl, ``buf curl --reflect-protocol grpc-v1``) and as v1alpha."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2

from nextbest.rpc.reflection import V1, V1ALPHA, v1_file
from tests.harness import ROOT, TOKENS, ServerThread, running_server

NEXTBEST = {"nextbest.v1.DecisionService", "nextbest.v1.AdminService", "nextbest.v1.ProfileService"}
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


@pytest.fixture(params=["auth off", "auth on"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerThread]:
    """Without auth the handlers are wrapped as they register, with auth interceptors run: both."""
    tokens = {"auth_tokens": TOKENS} if request.param == "auth on" else {}
    with running_server(f"sqlite:///{tmp_path}/nb.db", **tokens) as s:
        yield s


def _ask(target: str, service: str, *requests: reflection_pb2.ServerReflectionRequest) -> list[reflection_pb2.ServerReflectionResponse]:
    """One ServerReflectionInfo stream of ``service`` (v1 and v1alpha have the same messages)."""
    with grpc.insecure_channel(target) as ch:
        call = ch.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return list(call(iter(requests), timeout=10))  # no token: reflection stays open with auth on


@pytest.mark.parametrize("service", [V1, V1ALPHA])
def test_both_versions_list_the_services_and_describe_them(served: ServerThread, service: str) -> None:
    listed, described = _ask(
        served.target,
        service,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="nextbest.v1.DecisionService"),
    )
    names = {s.name for s in listed.list_services_response.service}
    assert names == NEXTBEST | {"grpc.health.v1.Health", V1, V1ALPHA}
    pool = descriptor_pool.DescriptorPool()
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in described.file_descriptor_response.file_descriptor_proto]
    for f in sorted(files, key=lambda f: len(f.dependency)):  # a file after those it imports
        pool.Add(f)
    choose = pool.FindServiceByName("nextbest.v1.DecisionService").methods_by_name["Choose"]
    assert (choose.input_type.full_name, choose.output_type.full_name) == ("nextbest.v1.ChooseRequest", "nextbest.v1.ChooseResponse")


def test_v1_describes_itself_in_its_own_package(served: ServerThread) -> None:
    (answer,) = _ask(served.target, V1, reflection_pb2.ServerReflectionRequest(file_containing_symbol=V1))
    (data,) = answer.file_descriptor_response.file_descriptor_proto
    f = descriptor_pb2.FileDescriptorProto.FromString(data)
    assert (f.name, f.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    method = f.service[0].method[0]
    assert (f.service[0].name, method.name, method.client_streaming, method.server_streaming) == (
        "ServerReflection",
        "ServerReflectionInfo",
        True,
        True,
    )
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert "v1alpha" not in str(f)
    assert f == v1_file()


def test_the_v1_file_is_v1alphas_renamed() -> None:
    v1, v1alpha = v1_file(), descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(v1alpha)
    assert [m.name for m in v1.message_type] == [m.name for m in v1alpha.message_type]
    for a, b in zip(v1.message_type, v1alpha.message_type, strict=True):  # field for field: the same bytes on the wire
        assert [(f.name, f.number, f.type, f.label) for f in a.field] == [(f.name, f.number, f.type, f.label) for f in b.field]
        assert [(f.HasField("type_name"), f.type_name.replace(".v1.", ".v1alpha.")) for f in a.field] == [
            (f.HasField("type_name"), f.type_name) for f in b.field
        ]


def test_an_unknown_symbol_is_not_found(served: ServerThread) -> None:
    (answer,) = _ask(served.target, V1, reflection_pb2.ServerReflectionRequest(file_containing_symbol="nextbest.v1.Nope"))
    assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


@pytest.mark.skipif(
    not BUF.exists() and shutil.which("buf") is None, reason="buf is not installed (scripts/test installs it when npm is present)"
)
def test_buf_curl_lists_the_methods_over_reflection_v1(served: ServerThread) -> None:
    buf = str(BUF) if BUF.exists() else str(shutil.which("buf"))
    r = subprocess.run(
        [
            buf,
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--reflect-protocol",
            "grpc-v1",
            "--list-methods",
            f"http://{served.target}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    methods = set(r.stdout.split())
    assert {"nextbest.v1.DecisionService/Choose", "nextbest.v1.AdminService/GetStats", "nextbest.v1.ProfileService/PutProfiles"} <= methods
