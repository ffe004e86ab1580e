"""The one multipart/form-data body builder the HTTP tests share."""

from __future__ import annotations

import uuid


def multipart(
    files: list[tuple[str, bytes]], fields: dict[str, str] | None = None, boundary: str = ""
) -> tuple[bytes, str]:
    """A multipart/form-data body with ``file`` parts and plain fields, and its Content-Type."""
    boundary = boundary or uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value.encode()
        + b"\r\n"
        for name, value in (fields or {}).items()
    ]
    for filename, data in files:
        quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file";'
            f' filename="{quoted}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
