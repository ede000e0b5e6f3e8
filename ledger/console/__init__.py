"""The auditor's console at /console/: server-rendered pages over the same read services as
the API, signed in with a read-API token kept in an HttpOnly, SameSite=Strict cookie."""

from ledger.console.app import create_console

__all__ = ["create_console"]
