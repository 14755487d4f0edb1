"""OpenAI-style errors of the BAGEL server: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations


__all__ = ["APIError", "error_body"]


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body of an OpenAI-style error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """
    An error answered to the client as an OpenAI-style JSON body.

    Args:
        status (`int`): HTTP status (4xx for the client's mistakes, 5xx for the server's).
        message (`str`): what went wrong, for the client; never a server path or a traceback.
        type (`str`, defaults to `"invalid_request_error"`): OpenAI's error type.
        param (`str`, *optional*): the request field to blame.
        code (`str`, *optional*): a short machine-readable code.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        """This error as its JSON body."""
        return error_body(self.message, self.type, self.param, self.code)
