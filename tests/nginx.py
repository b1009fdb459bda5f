"""A real nginx (Debian's nginx-light, WebDAV module) on 127.0.0.1 as a remote cache.

    with Nginx(tmp_path / "nginx") as server:          # or the `nginx` fixture
        server.url                                      # http://127.0.0.1:<port>/cache/
        server.stop()                                   # the server goes away (a fault)

The configuration is written here: ``dav_methods PUT; create_full_put_path on;`` under
``/cache/``, its own prefix, pid file, logs and temporary directories in the given
directory, and optionally ``auth_basic`` with a password file in nginx's ``{SHA}`` scheme.
nginx runs in the foreground (``daemon off``) as a child of the test and is stopped by it.
"""

import base64
import hashlib
import os
import signal
import socket
import subprocess
import time

import pytest

NGINX = "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, up: bool, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise AssertionError(f"port {port} did not come {'up' if up else 'down'}")


class Nginx:
    def __init__(self, directory, users=None, bearer=None):
        self.dir = str(directory)
        self.users = users  # {user: password} -> auth_basic on /cache/
        self.bearer = bearer  # a token -> only "Authorization: Bearer <token>" is let in
        self.store = os.path.join(self.dir, "store")
        self.port = None
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/cache/"

    def entries(self) -> dict:
        """{path below /cache/: bytes} of every file nginx stored."""
        found = {}
        top = os.path.join(self.store, "cache")
        for root, _, names in os.walk(top):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as handle:
                    found[os.path.relpath(path, top)] = handle.read()
        return found

    def _config(self) -> str:
        auth = ""
        if self.users:
            with open(os.path.join(self.dir, "htpasswd"), "w") as handle:
                for user, password in self.users.items():
                    digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
                    handle.write(f"{user}:{{SHA}}{digest}\n")
            auth = f'auth_basic "cache"; auth_basic_user_file {self.dir}/htpasswd;'
        if self.bearer:
            auth += f'if ($http_authorization != "Bearer {self.bearer}") {{ return 401; }}'
        temp = {name: os.path.join(self.dir, "tmp", name) for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in list(temp.values()) + [os.path.join(self.store, "cache")]:
            os.makedirs(path, exist_ok=True)
        # Started as root, nginx would run its workers as www-data, who cannot write here.
        user = "user root;" if os.geteuid() == 0 else ""
        return f"""
{user}
daemon off;
worker_processes 2;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {self.dir}/access.log;
    client_body_temp_path {temp['body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    server {{
        listen 127.0.0.1:{self.port};
        root {self.store};
        client_max_body_size 0;
        location /cache/ {{
            dav_methods PUT;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            {auth}
        }}
    }}
}}
"""

    def start(self) -> "Nginx":
        os.makedirs(self.dir, exist_ok=True)
        if self.port is None:
            self.port = free_port()
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as handle:
            handle.write(self._config())
        self.proc = subprocess.Popen([NGINX, "-p", self.dir, "-c", conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(self.port, up=True)
        except AssertionError:
            self.proc.kill()
            raise AssertionError(f"nginx did not start: {self.proc.stderr.read().decode()}")
        return self

    def stop(self) -> None:
        """Stop nginx (fast shutdown) and wait until the port refuses connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            wait_for_port(self.port, up=False)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def nginx(tmp_path):
    if not os.access(NGINX, os.X_OK):
        pytest.fail("nginx is not installed: ./run installs nginx-light")
    with Nginx(tmp_path / "nginx") as server:
        yield server
