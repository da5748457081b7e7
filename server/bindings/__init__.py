"""The bindings: wire forms of the data plane (server/dataplane/), one file each, registered in
server.app (GRPC_BINDINGS, REST_BINDINGS). They translate requests into data-plane calls and
`InferError`s into statuses, and nothing more.

grpc_inference.py (Open Inference Protocol), grpc_vision.py (vision API), with grpc_boundary.py (the
gRPC error boundary) and grpc_wire.py (zero-copy ModelInferRequest parsing, protocol tensors);
rest.py (the REST server the REST bindings share), rest_v2.py (KServe v2), rest_vision.py (vision API);
v2_messages.py and vision_messages.py (the protocols' answers, sent by gRPC and as JSON by REST).
"""
