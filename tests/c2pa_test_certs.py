"""A throwaway C2PA certificate chain for tests: a root CA and an end-entity signer.

C2PA refuses self-signed signers, so the chain has two certificates. The signer carries
what the C2PA certificate profile asks for: v3, basicConstraints CA:FALSE, keyUsage
digitalSignature (critical), an accepted EKU (emailProtection), subject and authority
key identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class SigningChain:
    chain_pem: str  # signer first, then the root (what the signer config wants)
    key_pem: str
    root_pem: str  # the trust anchor


def _usage(*, signer: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not signer,
        crl_sign=not signer,
        encipher_only=False,
        decipher_only=False,
    )


def make_chain(common_name: str = "zimage-pipeline test signer") -> SigningChain:
    now = datetime.now(UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "zimage-pipeline test root"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zimage-pipeline tests"),
        ]
    )
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(signer=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    signer = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "zimage-pipeline tests"),
                ]
            )
        )
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(signer=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    root_pem = root.public_bytes(pem).decode()
    return SigningChain(
        chain_pem=signer.public_bytes(pem).decode() + root_pem,
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        root_pem=root_pem,
    )


def write_chain(chain: SigningChain, directory: Path) -> tuple[Path, Path, Path]:
    """(chain file, key file, trust anchor file) written under `directory`."""
    chain_file, key_file, root_file = (
        directory / "signer-chain.pem",
        directory / "signer.key",
        directory / "root.pem",
    )
    chain_file.write_text(chain.chain_pem)
    key_file.write_text(chain.key_pem)
    key_file.chmod(0o600)
    root_file.write_text(chain.root_pem)
    return chain_file, key_file, root_file
