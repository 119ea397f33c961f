"""One gRPC channel per runner process (a node), shared by every model it hosts.

The channel's TLS server name is pinned to the node's certificate
(`<node-id>.runner.<crunch>.invalid`), and a node's FanOut goes out on it. It
stays open while any of the node's models is known to the client, so
forgetting one model (stopped, replaced, over its limits) never cancels a call
or fan-out in flight for the node's other models; it closes when the last one
leaves.

Each channel keeps what tokens sent on it must bind: `cert_sha256`, the
certificate it was opened with (the files may be renewed since), and
`destination`, the TLS key of the runner as its identity check saw it (SMP-35).
"""

from __future__ import annotations

from collections.abc import Coroutine

import grpc
from grpc_health.v1 import health_pb2

from secure_runner.client.security import CoordinatorSecurity
from secure_runner.smp.identity import PeerIdentity, Role
from secure_runner.transport import tls
from secure_runner.v1 import runner_pb2

SETUP_RPC = "/secure_runner.v1.ModelRunner/Setup"
CALL_RPC = "/secure_runner.v1.ModelRunner/Call"
FANOUT_RPC = "/secure_runner.v1.ModelRunner/FanOut"
HEALTH_CHECK_RPC = "/grpc.health.v1.Health/Check"
# Reconnect quickly to a runner or orchestrator that comes back (gRPC's default backoff grows to 120 s).
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

NodeKey = tuple[str, str]  # (address, node id)


def channel_options(server_name: str) -> list[tuple[str, object]]:
    return tls.channel_options(server_name) + RECONNECT_OPTIONS


class NodeChannel:
    """The channel to one node and its method callables."""

    def __init__(
        self, address: str, node_id: str, server_name: str, credentials: grpc.ChannelCredentials, cert_sha256: str
    ) -> None:
        self.address = address
        self.node_id = node_id
        self.server_name = server_name
        self.cert_sha256 = cert_sha256  # of the client certificate this channel presents
        self.destination: str | None = None  # SHA-256 of the runner's TLS key, once its identity is verified
        self.channel = grpc.aio.secure_channel(address, credentials, options=channel_options(server_name))
        self.setup = self.channel.unary_unary(SETUP_RPC, response_deserializer=runner_pb2.SetupResponse.FromString)
        self.call = self.channel.unary_unary(CALL_RPC, response_deserializer=runner_pb2.CallResponse.FromString)
        self.fan_out = self.channel.unary_stream(
            FANOUT_RPC, response_deserializer=runner_pb2.FanOutResults.FromString
        )
        self.health = self.channel.unary_unary(
            HEALTH_CHECK_RPC,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        self.users = 0  # models reaching the node through this channel


class NodeChannels:
    """The open node channels of one client, by (address, node id)."""

    def __init__(self, crunch_id: str, security: CoordinatorSecurity) -> None:
        self._crunch_id = crunch_id
        self._security = security
        self._open: dict[NodeKey, NodeChannel] = {}

    def acquire(self, address: str, node_id: str) -> NodeChannel:
        """The node's channel (opened if needed), for one more model."""
        node = self._open.get((address, node_id))
        if node is None:
            server_name = PeerIdentity.make(self._crunch_id, Role.RUNNER, node_id).tls_server_name
            credentials, cert_sha256 = tls.client_credentials(self._security.tls)
            node = self._open[address, node_id] = NodeChannel(address, node_id, server_name, credentials, cert_sha256)
        node.users += 1
        return node

    def release(self, node: NodeChannel) -> Coroutine[None, None, None] | None:
        """One model less uses `node`; after the last, the channel's closing, for the caller to await."""
        node.users -= 1
        if node.users:
            return None
        del self._open[node.address, node.node_id]
        return node.channel.close()
