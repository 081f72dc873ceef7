"""How a service plugs into a node: an object with `start(ctx)`, given the node's declared context."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from node.context import NodeContext
from node.net.access import NodeAccess


class NodeService(Protocol):
    """Something a node runs besides training (chain link, audit, paid inference, a test's deviation).

    `start` is awaited once, after the runner chose the stage (and built `ctx.worker`, when it has one)
    and before the ready line; it registers stream handlers on `ctx.host` or starts tasks in
    `ctx.nursery`. An exception stops the node before it trains. `close` is called once when the node
    shuts down.
    """

    async def start(self, ctx: NodeContext) -> None: ...

    def close(self) -> None:
        """Release what the service holds (chain connections, files); called once at shutdown, also after a
        failed start or run, in reverse order of the services."""
        ...


@runtime_checkable
class AccessProvider(Protocol):
    """A service that decides who may use the node's protocols (the chain link in on-chain mode): the daemon
    gives its `access` to discovery and the runner before anything is served."""

    access: NodeAccess
