"""TLS for the gRPC port: server credentials from PEM files, with optional client certificates.

With ``tls_client_ca_file`` the server requires a client certificate signed by that CA (mTLS);
without it any client may connect over TLS. Files are read once at start; a missing or
unreadable file stops the start with a message naming the setting.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from nextbest.bandit.errors import InvalidInput


def _read(path: str, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidInput(setting, f"cannot read {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise InvalidInput(setting, f"{path} is not a PEM file")
    return data


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``; mTLS when a client CA is given."""
    if not cert_file or not key_file:
        raise InvalidInput("tls_cert_file" if not cert_file else "tls_key_file", "TLS needs both a certificate and a key")
    cert = _read(cert_file, "tls_cert_file")
    key = _read(key_file, "tls_key_file")
    if b"PRIVATE KEY-----" not in key:
        raise InvalidInput("tls_key_file", f"{key_file} holds no private key")
    ca = _read(client_ca_file, "tls_client_ca_file") if client_ca_file else None
    creds: grpc.ServerCredentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
    return creds


def check_settings(cert_file: str, key_file: str, client_ca_file: str) -> None:
    """Reject half a TLS configuration (it would silently serve in clear)."""
    if bool(cert_file) != bool(key_file):
        raise InvalidInput("tls_cert_file" if not cert_file else "tls_key_file", "set both tls_cert_file and tls_key_file")
    if client_ca_file and not cert_file:
        raise InvalidInput("tls_client_ca_file", "client certificates need TLS: set tls_cert_file and tls_key_file")


def channel_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """Client side: trust ``ca_file`` (system roots when empty); present a certificate for mTLS."""
    ca = _read(ca_file, "ca_file") if ca_file else None
    cert = _read(cert_file, "cert_file") if cert_file else None
    key = _read(key_file, "key_file") if key_file else None
    creds: grpc.ChannelCredentials = grpc.ssl_channel_credentials(ca, key, cert)
    return creds
