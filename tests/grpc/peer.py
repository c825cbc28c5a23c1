"""A real gRPC server and client (grpcio) for tests/grpc.rs, with no generated code: methods
are registered by name and carry raw bytes.

  peer.py serve [--tls CERT KEY]      serves /test.Echo/* on a loopback port, prints the port
  peer.py call TARGET AUTHORITY [--tls CA]
                                      runs every call kind through TARGET and prints JSON
"""
import json
import sys
import time

import grpc

SERVICE = "test.Echo"


def identity(b):
    return b


def unary(request, context):
    if request == b"fail":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "details: the request asked to fail")
    if request.startswith(b"sleep:"):
        time.sleep(int(request[6:]) / 1000)
    context.set_trailing_metadata((("x-trailer", "unary"),))
    return b"echo:" + request


def server_stream(request, context):
    for i in range(int(request)):
        yield b"item-%d" % i


def client_stream(requests, context):
    count = 0
    total = 0
    for r in requests:
        count += 1
        total += len(r)
    return b"%d messages, %d bytes" % (count, total)


def bidi(requests, context):
    for r in requests:
        yield r.upper()


def serve(args):
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, identity, identity),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, identity, identity),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, identity, identity),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, identity, identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if args[:1] == ["--tls"]:
        cert, key = open(args[1], "rb").read(), open(args[2], "rb").read()
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(((key, cert),)))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    # Until the test closes stdin (or ends).
    sys.stdin.read()
    server.stop(0)


def call(args):
    target, authority = args[0], args[1]
    options = [("grpc.default_authority", authority)]
    if args[2:3] == ["--tls"]:
        creds = grpc.ssl_channel_credentials(root_certificates=open(args[3], "rb").read())
        options.append(("grpc.ssl_target_name_override", authority))
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    method = lambda kind, name: getattr(channel, kind)(
        "/%s/%s" % (SERVICE, name), request_serializer=identity, response_deserializer=identity
    )
    out = {}

    def attempt(name, f):
        try:
            out[name] = {"ok": f()}
        except grpc.RpcError as e:
            out[name] = {"code": e.code().name, "details": e.details()}

    def unary_call():
        response, call = method("unary_unary", "Unary").with_call(b"hello", timeout=10)
        trailers = dict(call.trailing_metadata() or ())
        return [response.decode(), trailers.get("x-trailer", "")]

    attempt("unary", unary_call)
    attempt("server_stream", lambda: [m.decode() for m in method("unary_stream", "ServerStream")(b"5", timeout=10)])
    attempt(
        "client_stream",
        lambda: method("stream_unary", "ClientStream")(iter([b"a" * 10, b"b" * 20, b"c" * 30]), timeout=10).decode(),
    )
    attempt(
        "bidi",
        lambda: [m.decode() for m in method("stream_stream", "Bidi")(iter([b"one", b"two", b"three"]), timeout=10)],
    )
    attempt("large", lambda: len(method("unary_unary", "Unary")(b"x" * 3_000_000, timeout=10)))
    attempt("error", lambda: method("unary_unary", "Unary")(b"fail", timeout=10).decode())
    attempt("deadline", lambda: method("unary_unary", "Unary")(b"sleep:3000", timeout=0.5).decode())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    {"serve": serve, "call": call}[sys.argv[1]](sys.argv[2:])
