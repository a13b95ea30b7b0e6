"""DICOM TLS (PS3.15 B.1, BCP 195): the `ssl` contexts for the node's port and for delivery.

Both sides refuse anything below TLS 1.2 and use Python's default cipher choice (OpenSSL's,
no anonymous or export suites). The server side verifies client certificates against the
configured CA when one is given: optionally (a certificate that is presented must verify) or
required (`tls_require_client_certificate`). The client side always verifies the peer: its
certificate must chain to the configured CA (or the system's) and name the host the node
connects to, so a PACS address that was redirected cannot receive results.

A file that is not a usable PEM certificate or key is a ConfigError naming the key, raised
when `serve` starts or a delivery is attempted.
"""

from __future__ import annotations

import ssl

from dicom_node.app.config import ConfigError, Destination, NodeConfig

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def server_context(node: NodeConfig) -> ssl.SSLContext | None:
    """The context the node's port speaks TLS with, or None when [node] has no certificate."""
    if not node.tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_pair(context, "node", node.tls_certificate, node.tls_private_key)
    if node.tls_ca_certificates:
        _load_ca(context, "node.tls_ca_certificates", node.tls_ca_certificates)
        context.verify_mode = (
            ssl.CERT_REQUIRED if node.tls_require_client_certificate else ssl.CERT_OPTIONAL
        )
    return context


def client_context(destination: Destination) -> ssl.SSLContext | None:
    """The context to reach `destination` with, or None when it is plain DICOM."""
    if not destination.tls:
        return None
    prefix = f"destinations[{destination.name}]"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, host name checked
    context.minimum_version = MINIMUM_VERSION
    if destination.tls_ca_certificates:  # then only this CA, not the system's too
        _load_ca(context, f"{prefix}.tls_ca_certificates", destination.tls_ca_certificates)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if destination.tls_certificate:
        _load_pair(context, prefix, destination.tls_certificate, destination.tls_private_key)
    return context


def _load_pair(context: ssl.SSLContext, prefix: str, certificate: str, private_key: str) -> None:
    try:
        context.load_cert_chain(certificate, private_key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"{prefix}.tls_certificate, {prefix}.tls_private_key: cannot load {certificate} "
            f"with {private_key} (PEM certificate and its unencrypted key): {error}"
        ) from None


def _load_ca(context: ssl.SSLContext, key: str, path: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"{key}: cannot load CA certificates from {path}: {error}") from None
