"""kombu's Redis transport, with channels that still reach Redis once their connection is lost.

When a worker loses Redis, Celery 5.7 collects the broken connection, which
forgets the transport's kombu Connection (`transport.client = None`), then
closes that connection, which closes the consumer's channel a second time.
That channel holds the messages of the jobs running (acknowledged late): it
puts them back in Redis, and to make a Redis client it reads
`transport.client.hostname`. The AttributeError reaches Celery as an
"Unrecoverable error" and the worker exits; a job finishing after the loss
acknowledges its message through the same channel, with the same error.

Here a channel keeps the Connection it was opened with and makes its clients
from it. Putting messages back while Redis is down then fails as a connection
error, which Celery expects and ignores (the message stays among Redis'
unacknowledged ones, and claim_job refuses a redelivery of a running job); an
acknowledgement once Redis is back goes through.
"""
from __future__ import annotations

from kombu.transport import redis


class Channel(redis.Channel):
    def __init__(self, connection, *args, **kwargs):
        self._opened_with = connection.client
        super().__init__(connection, *args, **kwargs)

    def _connparams(self, asynchronous=False):
        if self.connection.client is None:  # collected after the connection was lost
            self.connection.client = self._opened_with
        return super()._connparams(asynchronous)


class Transport(redis.Transport):
    Channel = Channel
