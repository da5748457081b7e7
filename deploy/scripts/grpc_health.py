#!/usr/bin/env python3
"""Container healthcheck: ask the server's grpc.health.v1 service, exit 0 only when it says SERVING.

Used by Docker HEALTHCHECK and compose (Kubernetes asks the same service with its native gRPC probe).
    grpc-health [--host 127.0.0.1] [--port 8001] [--service NAME] [--timeout 3]
"""
import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--service", default="", help="'' = the whole server")
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args()
    with grpc.insecure_channel(f"{args.host}:{args.port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
