"""The exceptions the use cases raise for a request they cannot honour."""


class Refused(Exception):
    """A request that cannot be honoured, with the reason in one line (the API's 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unavailable(Refused):
    """A sound request that a service it needs, down for now, kept from being carried out:
    worth asking again later (the API's 503)."""
