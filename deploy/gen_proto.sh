#!/usr/bin/env bash
# Regenerate aptray/proto/*_pb2.py, *.pyi and *_pb2_grpc.py from the .proto files (grpcio-tools).
# Compiling from the repository root (-I .) makes protoc name the modules aptray.proto.<name>_pb2:
# the grpc modules then import `from aptray.proto import <name>_pb2` and message classes carry
# their real module path (Ray pickles request messages between Serve's gRPC proxy and replicas).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
  aptray/proto/shard.proto aptray/proto/generate.proto
grep -q "^from aptray.proto import" aptray/proto/shard_pb2_grpc.py aptray/proto/generate_pb2_grpc.py
echo "regenerated aptray/proto"
