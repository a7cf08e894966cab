"""The agent protocol, the host-side client and the in-guest server.

Everything in this package except client.py runs inside the guest too, so it imports only
the standard library, grpc and protobuf.
"""
