#!/usr/bin/env bash
# Regenerate goml/proto/*_pb2*.py(i) from proto/goml/proto/*.proto. The generated files
# are committed, so users need no grpcio-tools; run this after editing a .proto file.
# The .proto files live under proto/goml/proto/ so that protoc's generated imports are
# already package imports (`from goml.proto import raft_pb2`).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. proto/goml/proto/*.proto
[ -f goml/proto/__init__.py ] || echo '"""Generated protobuf and gRPC code (scripts/gen_proto.sh)."""' > goml/proto/__init__.py
