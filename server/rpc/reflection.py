"""Server reflection as v1 and as v1alpha.

grpcurl, ``buf curl --reflect-protocol grpc-v1`` and newer tools ask
``grpc.reflection.v1.ServerReflection``; older ones ask v1alpha. grpcio-reflection (1.85) ships
v1alpha only. The two are one service: v1 has the same messages, field for field, in package
grpc.reflection.v1, so the library's servicer answers both names with v1alpha's message classes
(the bytes on the wire are the same). The v1 file is v1alpha's renamed, added to the default
descriptor pool so that a client can describe the v1 service too.

The .proto files' comments are not served: the generated modules carry no source info, and the
library sends descriptors copied with ``FileDescriptor.CopyToProto``, which drops it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA: str = reflection.SERVICE_NAME
V1 = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def enable_reflection(service_names: Iterable[str], server: Any) -> None:
    """Serve reflection under both names on ``server`` (a grpc.aio.Server or a stand-in that
    registers handlers), listing ``service_names`` and the two reflection services."""
    _add_v1_file()
    servicer = reflection.aio.ReflectionServicer((*service_names, V1, V1ALPHA))
    for service in (V1, V1ALPHA):
        handlers = {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)


def v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file with package v1 (and no options,
    which name v1alpha's Java and Go packages)."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."

    def renamed(name: str) -> str:
        return new + name.removeprefix(old) if name.startswith(old) else name

    def messages(types: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for m in types:
            for f in m.field:
                if f.HasField("type_name"):  # set only for messages and enums
                    f.type_name = renamed(f.type_name)
            messages(m.nested_type)

    messages(proto.message_type)
    for s in proto.service:
        for method in s.method:
            method.input_type, method.output_type = renamed(method.input_type), renamed(method.output_type)
    return proto


def _add_v1_file() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)  # added before (another server in this process), or a library's own
    except KeyError:
        pool.AddSerializedFile(v1_file().SerializeToString())
