"""nginx as a baseline: round robin or `least_conn`, streaming unbuffered, keep-alive upstreams."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path


def binary() -> str | None:
    """Path of the nginx binary, or None when it is not installed."""
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )


def config(directory: Path, port: int, upstreams: Sequence[str], *, least_conn: bool) -> Path:
    """Write an nginx.conf for one worker (one core, like Rower) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(f"        server {address} max_fails=0;" for address in upstreams)
    text = f"""
worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    upstream llama {{
        {"least_conn;" if least_conn else ""}
{servers}
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://llama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
            proxy_next_upstream off;
        }}
    }}
}}
"""
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


def argv(conf: Path) -> list[str]:
    """Command line that runs nginx in the foreground with `conf`."""
    return [
        binary() or "nginx",
        "-p",
        str(conf.parent),
        "-c",
        str(conf),
        "-e",
        str(conf.parent / "error.log"),
    ]
