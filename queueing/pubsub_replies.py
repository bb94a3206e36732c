"""Replies read off a Redis connection in subscribe mode, parsed by hiredis.

Every token of every stream crosses here, so the subscriber's reader takes the
socket's bytes itself and hands them to hiredis's C parser (the one redis-py
uses when it is installed), getting every reply a ``recv`` completed at once,
instead of one ``read_response`` call, with its Python layers, per message.
"""

from __future__ import annotations

import socket
from typing import Any

import hiredis
import redis

Reply = list[Any]  #: a reply's elements: bytes, int or None

_READ_SIZE = 65536


class ReplyReader:
    """Parses the replies that arrive on ``sock``, one ``recv`` at a time."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._parser = hiredis.Reader(protocolError=redis.ConnectionError, replyError=redis.ResponseError)

    def read(self) -> list[Reply]:
        """The replies completed by the next ``recv`` (blocks until there is at least one).

        Raises ``redis.ConnectionError`` if the server closed the connection or sent
        what is not RESP, ``redis.ResponseError`` for an error reply, and the socket's
        own errors (``TimeoutError`` when its timeout passes without a byte).
        """
        parser = self._parser
        while True:
            data = self._sock.recv(_READ_SIZE)
            if not data:
                raise redis.ConnectionError("Redis closed the connection")
            parser.feed(data)
            replies = []
            while (reply := parser.gets()) is not False:
                if isinstance(reply, Exception):
                    raise reply
                if not isinstance(reply, list):
                    raise redis.ConnectionError(f"unexpected reply on a pub/sub connection: {reply!r:.100}")
                replies.append(reply)
            if replies:
                return replies
