"""
txqb's public contracts, as zope interfaces.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Interface

__all__ = ["IServiceHandlers"]


class IServiceHandlers(Interface):
    """
    What a service does with its connections: libqb's
    ``struct qb_ipcs_service_handlers``, one method per callback.

    L{txqb.server.ServiceHandlers} implements every method with libqb's
    defaults, so a service overrides only what it needs.
    """

    def connectionAccepted(connection: Any, uid: int, gid: int) -> int:
        """
        Decide whether a new client may connect (``connection_accept``).

        ``uid`` and ``gid`` come from the kernel (``SO_PEERCRED``), never
        from a message.  Return 0 (or L{None} or C{True}) to accept, or
        ``-errno`` (a positive errno works too) to refuse; the client
        receives that errno.  C{False} refuses with ``EACCES``; raising
        L{txqb.errors.QBError} refuses with its errno, and any other
        exception is logged and refuses with ``EIO``.  The method may call
        C{connection.setAuth(uid, gid, mode)} to set the owner and mode of
        the connection's shared files.
        """

    def connectionCreated(connection: Any) -> None:
        """
        The handshake is complete and the client may send
        (``connection_created``).  Events sent from here are not lost.
        """

    def messageReceived(connection: Any, msgId: int, payload: bytes) -> Any:
        """
        A request arrived (``msg_process``).

        The handler may answer with C{connection.respond(...)}, which sends
        at once, or by returning the answer (do not mix the two on one
        connection: a direct response overtakes returned ones still
        pending): C{bytes} (a response with the request's
        id and error 0), a L{txqb.Message} (id, error and payload of its
        own), or L{None} (no response).  It may return a L{Deferred} or be
        an C{async def}; returned answers are sent in request order, so
        clients, which pair responses by position, stay in step.  A
        handler that raises L{txqb.errors.QBError} answers with that
        errno; any other exception is logged and answered with ``-EIO``.
        """

    def connectionClosed(connection: Any) -> Any:
        """
        The connection is going away (``connection_closed``), called only
        for connections that were created.

        Return L{None} or 0 when done; a non-zero int asks to be called
        again a little later (libqb's retry); a L{Deferred} delays the
        teardown until it fires.
        """

    def connectionDestroyed(connection: Any) -> None:
        """
        Last call for a connection, created or refused
        (``connection_destroyed``): release what C{connectionAccepted}
        allocated.
        """
