"""The local stack's TLS: a CA of its own and a certificate it signs for 127.0.0.1 and localhost, made with
openssl at the first start (the SSL and SASL_SSL listeners present it)."""
from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from pathlib import Path

from streams.stack.common import StackError, require, write_private

CERT_DAYS = 3650


def ensure_certificates(tls: Path) -> Path:
    """The TLS listeners' keystore (its key, its certificate, the CA's), made with openssl at the first
    start into ``tls/``: a CA (``ca.pem``; its key ``ca-key.pem``) and a certificate it signs for
    127.0.0.1 and localhost. Made again, CA and all, when a file is missing or the certificate ends
    within a day. Keys and the keystore are mode 0600."""
    keystore, ca, ca_key = tls / "broker-keystore.pem", tls / "ca.pem", tls / "ca-key.pem"
    openssl = require("openssl", "the local stack makes its TLS certificates with openssl")
    if all(p.exists() for p in (keystore, ca, ca_key)) and subprocess.run(
            [openssl, "x509", "-in", str(keystore), "-noout", "-checkend", "86400"],
            capture_output=True).returncode == 0:
        return keystore
    tls.mkdir(parents=True, exist_ok=True)

    def run(*args: str, stdin: bytes | None = None) -> bytes:
        proc = subprocess.run([openssl, *args], input=stdin, capture_output=True)
        if proc.returncode != 0:
            raise StackError(f"openssl {args[0]} failed making the stack's TLS certificates: "
                             f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
        return proc.stdout

    def new_key() -> bytes:  # PKCS#8 PEM, unencrypted: what Kafka's PEM keystore reads
        return run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")

    ca_key_pem, broker_key_pem = new_key(), new_key()
    write_private(ca_key, ca_key_pem.decode())
    broker_key = tls / "broker-key.pem"
    write_private(broker_key, broker_key_pem.decode())
    ca_pem = run("req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", str(CERT_DAYS),
                 "-subj", f"/CN=imagefork local stack CA {uuid.uuid4().hex[:8]}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ca.write_bytes(ca_pem)
    os.chmod(ca, 0o644)
    csr = run("req", "-new", "-key", str(broker_key), "-subj", "/CN=localhost")
    ext = tls / "broker.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    try:
        cert = run("x509", "-req", "-CA", str(ca), "-CAkey", str(ca_key), "-set_serial",
                   f"0x{secrets.token_hex(16)}", "-days", str(CERT_DAYS), "-sha256", "-extfile", str(ext),
                   stdin=csr)
    finally:
        ext.unlink(missing_ok=True)
    broker_key.unlink()
    write_private(keystore, (broker_key_pem + cert + ca_pem).decode())
    return keystore
