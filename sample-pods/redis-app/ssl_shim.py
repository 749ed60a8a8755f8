"""Stand-in for the `ssl` module, which componentize-py's bundled CPython cannot import (no `_ssl`).

redis-py does `import ssl` unconditionally (redis/connection.py, redis/asyncio/*.py) and uses a few
names at import time (ssl.TLSVersion in annotations; SSLError & co. in redis/_parsers/socket.py).
redis_app.py installs this module as sys.modules["ssl"] only when the real one fails to import.
Anything that would actually need TLS raises NotImplementedError; plain-TCP Redis is unaffected.
"""
import enum

_MSG = "TLS is not available in this WASI component (componentize-py ships no _ssl)"

CERT_NONE, CERT_OPTIONAL, CERT_REQUIRED = 0, 1, 2
PROTOCOL_TLS_CLIENT = 16
HAS_SNI = False
OPENSSL_VERSION = "none"


class TLSVersion(enum.IntEnum):
    MINIMUM_SUPPORTED = -2
    MAXIMUM_SUPPORTED = -1
    SSLv3 = 0x0300
    TLSv1 = 0x0301
    TLSv1_1 = 0x0302
    TLSv1_2 = 0x0303
    TLSv1_3 = 0x0304


class SSLError(OSError):
    pass


class SSLZeroReturnError(SSLError):
    pass


class SSLWantReadError(SSLError):
    pass


class SSLWantWriteError(SSLError):
    pass


class SSLSyscallError(SSLError):
    pass


class SSLEOFError(SSLError):
    pass


class CertificateError(SSLError, ValueError):
    pass


SSLCertVerificationError = CertificateError


class SSLContext:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(_MSG)


class SSLSocket:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(_MSG)


def create_default_context(*args, **kwargs):
    raise NotImplementedError(_MSG)


def get_server_certificate(*args, **kwargs):
    raise NotImplementedError(_MSG)


def DER_cert_to_PEM_cert(*args, **kwargs):
    raise NotImplementedError(_MSG)
