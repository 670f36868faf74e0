"""A private slapd for tests that must stop the directory: its own port and data, seeded
from config/ldap/seed.ldif, configured like scripts/services.sh (StartTLS with the local
CA). The shared slapd on 3389 is never touched."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

BASE = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{BASE}"
BIND_DN = f"uid=zimage-svc,ou=services,{BASE}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.fail(f"{name} not found: run scripts/services.sh up (installs slapd, ldap-utils)")
    return found


class PrivateSlapd:
    def __init__(self, root: Path) -> None:
        tls = PROJECT_ROOT / ".local" / "ldap" / "tls"
        if not (tls / "server.crt").is_file():
            pytest.fail(f"{tls} has no certificate: run scripts/services.sh up")
        self.ca_cert = tls / "ca.crt"
        self.port = _free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.root = root
        self.admin_password = secrets.token_urlsafe(16)
        (root / "data").mkdir(parents=True)
        self.bind_password_file = root / "bind_password"
        self.bind_password_file.write_text(secrets.token_urlsafe(16), encoding="utf-8")
        self.conf = root / "slapd.conf"
        self.conf.write_text(
            "\n".join(
                [
                    *(
                        f"include /etc/ldap/schema/{s}.schema"
                        for s in ("core", "cosine", "inetorgperson", "nis")
                    ),
                    "modulepath /usr/lib/ldap",
                    "moduleload back_mdb",
                    "moduleload memberof",
                    f"pidfile {root / 'slapd.pid'}",
                    f"TLSCACertificateFile {tls / 'ca.crt'}",
                    f"TLSCertificateFile {tls / 'server.crt'}",
                    f"TLSCertificateKeyFile {tls / 'server.key'}",
                    "database mdb",
                    "maxsize 10485760",
                    f'suffix "{BASE}"',
                    f'rootdn "{ADMIN_DN}"',
                    f"rootpw {self.admin_password}",
                    f"directory {root / 'data'}",
                    "overlay memberof",
                    "access to attrs=userPassword by self write by anonymous auth by * none",
                    "access to * by users read by * none",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # -d 0: stay in the foreground, so this fixture owns (and can stop) the process.
        log = (self.root / "slapd.log").open("ab")
        self.process = subprocess.Popen(
            [_tool("slapd"), "-d", "0", "-f", str(self.conf), "-h", f"{self.url}/"],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"private slapd exited: see {self.root / 'slapd.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        pytest.fail("private slapd did not open its port")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self.process = None

    def seed(self) -> None:
        ldap = ["-x", "-H", self.url, "-D", ADMIN_DN, "-w", self.admin_password]
        seed = PROJECT_ROOT / "config" / "ldap" / "seed.ldif"
        subprocess.run([_tool("ldapadd"), *ldap, "-f", str(seed)], check=True, capture_output=True)
        password = self.bind_password_file.read_text(encoding="utf-8")
        subprocess.run(
            [_tool("ldappasswd"), *ldap, "-s", password, BIND_DN], check=True, capture_output=True
        )
