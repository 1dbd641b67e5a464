"""The request errors the API answers with a status and the field at fault."""
from __future__ import annotations


class BadRequest(Exception):
    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status
