#!/usr/bin/env python3
"""Container healthcheck: ask the server's grpc.health.v1 service, exit 0 only when it says SERVING.

Used by Docker HEALTHCHECK and compose (Kubernetes asks the same service with its native gRPC probe).
    grpc-health [--host 127.0.0.1] [--port 8001] [--service NAME] [--timeout 3]
                [--root-cert CA.pem [--client-cert C.pem --client-key K.pem] [--server-name NAME]]
                [--header NAME=VALUE]

With --root-cert it speaks TLS (a server started with --grpc-use-ssl), with a client certificate for
mutual TLS; --header sends the key of a restricted `health` group (VALUE may be env:VARIABLE).
"""

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--service", default="", help="'' = the whole server")
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--root-cert", help="PEM CA of the server certificate: connect over TLS")
    ap.add_argument("--client-cert", help="PEM client certificate (mutual TLS)")
    ap.add_argument("--client-key", help="PEM key of --client-cert")
    ap.add_argument("--server-name", help="name to check the server certificate against (default: --host)")
    ap.add_argument("--header", action="append", default=[], help="NAME=VALUE sent with the check")
    args = ap.parse_args()
    target = f"{args.host}:{args.port}"
    if args.root_cert:

        def read(path):
            with open(path, "rb") as f:
                return f.read()

        creds = grpc.ssl_channel_credentials(
            read(args.root_cert), args.client_key and read(args.client_key), args.client_cert and read(args.client_cert)
        )
        options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    metadata = []
    for h in args.header:
        name, _, value = h.partition("=")
        metadata.append((name.lower(), os.environ.get(value[4:], "") if value.startswith("env:") else value))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
