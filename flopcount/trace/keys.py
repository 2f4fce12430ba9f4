"""Ed25519 signing keys for manifests (``flopcount keys new KEYDIR``; docs/traces.md "Threat model").

The private key stays with whoever operates the meter (``FLOPCOUNT_SIGNING_KEY`` or
``meter(signing_key=PATH)``); an auditor verifies with the public key alone
(``flopcount verify DIR --public-key flopcount-verify.pem``). Each signed manifest entry carries
the signature of its ``hash`` and the key id: the first 32 hex digits of the SHA-256 of the raw
32-byte public key.
"""
from __future__ import annotations

from ..errors import BadInput

import base64
import hashlib
import os

from .storage import TraceError

SIGNING_KEY_ENV = "FLOPCOUNT_SIGNING_KEY"
PRIVATE_NAME = "flopcount-signing.pem"
PUBLIC_NAME = "flopcount-verify.pem"


def _serialization():
    from cryptography.hazmat.primitives import serialization

    return serialization


def key_id(public_key) -> str:
    raw = public_key.public_bytes(_serialization().Encoding.Raw, _serialization().PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def new_keys(keydir) -> tuple[str, str, str]:
    """Write KEYDIR/flopcount-signing.pem (mode 600) and KEYDIR/flopcount-verify.pem; refuses to
    overwrite an existing key. Returns (private path, public path, key id)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ser = _serialization()
    keydir = os.fspath(keydir)
    private_path, public_path = os.path.join(keydir, PRIVATE_NAME), os.path.join(keydir, PUBLIC_NAME)
    for path in (private_path, public_path):
        if os.path.exists(path):
            raise BadInput(f"flopcount: {path} exists: keys are never overwritten; choose another KEYDIR")
    try:
        os.makedirs(keydir, exist_ok=True)
    except OSError as e:
        raise BadInput(f"flopcount: cannot create {keydir}: {e.strerror}") from None
    private = Ed25519PrivateKey.generate()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    os.chmod(private_path, 0o600)  # whatever the umask
    with open(public_path, "wb") as f:
        f.write(private.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path, key_id(private.public_key())


class Signer:
    """Signs manifest entry hashes with an Ed25519 private key."""

    def __init__(self, private_key) -> None:
        self.private_key = private_key
        self.key_id = key_id(private_key.public_key())

    def sign(self, entry_hash: str) -> str:
        return base64.b64encode(self.private_key.sign(entry_hash.encode())).decode()


def load_signer(path) -> Signer:
    """The Signer of a private key PEM file; ValueError (one line) when it is not one."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            key = _serialization().load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise BadInput(f"flopcount: cannot read the signing key {path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise BadInput(f"flopcount: {path} is not an unencrypted PEM private key: "
                         "create one with `flopcount keys new KEYDIR`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInput(f"flopcount: {path} is not an Ed25519 key: create one with `flopcount keys new KEYDIR`")
    return Signer(key)


def signer_from(signing_key=None) -> Signer | None:
    """The Signer for ``meter(signing_key=...)`` (a path or a Signer), else FLOPCOUNT_SIGNING_KEY, else None."""
    if isinstance(signing_key, Signer):
        return signing_key
    path = signing_key if signing_key is not None else os.environ.get(SIGNING_KEY_ENV) or None
    return None if path is None else load_signer(path)


class Verifier:
    """Checks Ed25519 signatures with a public key the user supplied."""

    def __init__(self, public_key, where: str = "") -> None:
        self.public_key = public_key
        self.key_id = key_id(public_key)
        self.where = where

    def valid(self, entry_hash: str, signature) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self.public_key.verify(base64.b64decode(signature, validate=True), entry_hash.encode())
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True


def load_verifier(public_key) -> Verifier:
    """A Verifier from a public key PEM path (or PEM bytes, or a Verifier); TraceError (exit 2) when
    it is not an Ed25519 public key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(public_key, Verifier):
        return public_key
    where = "the public key"
    if isinstance(public_key, (bytes, bytearray)):
        data = bytes(public_key)
    else:
        where = os.fspath(public_key)
        try:
            with open(where, "rb") as f:
                data = f.read(1 << 16)
        except OSError as e:
            raise TraceError(f"flopcount: cannot read the public key {where}: {e.strerror}") from None
    try:
        key = _serialization().load_pem_public_key(data)
    except (ValueError, TypeError):
        raise TraceError(f"flopcount: {where} is not a PEM public key: pass the flopcount-verify.pem "
                         "written by `flopcount keys new`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise TraceError(f"flopcount: {where} is not an Ed25519 public key: pass the flopcount-verify.pem "
                         "written by `flopcount keys new`")
    return Verifier(key, where)
