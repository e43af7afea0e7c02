#!/usr/bin/env bash
# Regenerate aptray/proto/*_pb2.py and *_pb2_grpc.py from the .proto files (grpcio-tools).
# The generated grpc modules import their _pb2 as a top-level module; rewrite that into a
# package-relative import so `aptray.proto` works without touching sys.path.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I aptray/proto --python_out=aptray/proto --pyi_out=aptray/proto \
  --grpc_python_out=aptray/proto aptray/proto/shard.proto aptray/proto/generate.proto
for name in shard generate; do
  sed -i -E "s/^import ${name}_pb2 as /from . import ${name}_pb2 as /" "aptray/proto/${name}_pb2_grpc.py"
done
echo "regenerated aptray/proto"
