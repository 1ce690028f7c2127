"""RS256 and ES256 (RFC 7518 section 3): loading PEM keys, verifying and signing.

Imported only by a server configured with ``auth.public_keys`` or ``auth.private_key``
(``core.auth``), since ``cryptography`` costs every process that loads it about 16 MB.
Pure: the key files arrive as bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_pem_public_key,
)

from etherd.core.config import ConfigError

__all__ = [
    "ES256",
    "RS256",
    "PrivateKey",
    "PublicKey",
    "algorithm_of",
    "load_private_key",
    "load_public_key",
    "sign",
    "verify",
]

RS256: Final = "RS256"
ES256: Final = "ES256"
MIN_RSA_BITS: Final = 2048
# ES256 signatures are r and s, 32 bytes each, big-endian (RFC 7518 section 3.4).
_P256_BYTES: Final = 32

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _read_pem(name: str, where: str, files: Mapping[str, bytes]) -> bytes:
    data = files.get(name)
    if data is None:
        raise ConfigError(f"{where}: {name} was not read (pass it in key_files)")
    return data


def _basename(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def load_public_key(name: str, where: str, files: Mapping[str, bytes]) -> PublicKey:
    """A public key (or a certificate's) from the PEM file ``name``.

    Raises:
        ConfigError: a missing file, a private key, or anything but RSA or P-256 EC.
    """
    data = _read_pem(name, where, files)
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(
            f"{where}: {name} holds a private key; give the public key instead "
            f"(`openssl pkey -in {_basename(name)} -pubout`) and keep the private key "
            f"for auth.private_key"
        )
    key: object
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"{where}: {name} is not a PEM public key or certificate "
            f"(expected '-----BEGIN PUBLIC KEY-----'): {exc}"
        ) from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError(
            f"{where}: {name} holds a {type(key).__name__}; only RSA (RS256) and P-256 "
            f"EC (ES256) keys are supported"
        )
    return key


def load_private_key(name: str, files: Mapping[str, bytes]) -> PrivateKey:
    """The unencrypted PEM private key ``name`` (``auth.private_key``).

    Raises:
        ConfigError: a missing, encrypted or unreadable file, or anything but RSA or P-256.
    """
    where = "auth.private_key"
    data = _read_pem(name, where, files)
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"{where}: {name} is encrypted; etherd needs an unencrypted PEM private key"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"{where}: {name} is not a PEM private key "
            f"(expected '-----BEGIN PRIVATE KEY-----'): {exc}"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"{where}: {name} holds a {type(key).__name__}; only RSA (RS256) and P-256 "
            f"EC (ES256) keys are supported"
        )
    return key


def algorithm_of(key: PublicKey | PrivateKey, where: str) -> str:
    """The one algorithm a key may be used with; refuses keys etherd will not use."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                f"{where}: the RSA key is {key.key_size} bits; RS256 needs at least {MIN_RSA_BITS}"
            )
        return RS256
    if not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(
            f"{where}: the EC key is on curve {key.curve.name}; ES256 needs P-256 (secp256r1)"
        )
    return ES256


def verify(key: PublicKey, signing_input: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the key's RS256 or ES256 signature of ``signing_input``."""
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
            return True
        if len(signature) != 2 * _P256_BYTES:
            return False
        r = int.from_bytes(signature[:_P256_BYTES], "big")
        s = int.from_bytes(signature[_P256_BYTES:], "big")
        key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


def sign(key: PrivateKey, signing_input: bytes) -> bytes:
    """The key's RS256 or ES256 signature of ``signing_input``."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")
