"""CNI error codes and the error the plugin reports."""

# Well-known codes (CNI spec, "Error codes").
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
NOT_AVAILABLE_LIMITED = 51

# dsipam's own codes (100 and up are the plugin's).
POOL_EXHAUSTED = 100
ADDRESS_IN_USE = 101
POOL_NOT_FOUND = 102
ALLOCATION_NOT_FOUND = 103
ALLOCATION_MISMATCH = 104
NOT_AUTHORIZED = 106
SERVER_ERROR = 110


class CniError(Exception):
    """An error the plugin prints as CNI error JSON (``code``, ``msg``, ``details``) and exits 1 with."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, object]:
        """The CNI error object."""
        out: dict[str, object] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def from_rpc(exc, method: str, endpoint: str) -> CniError:  # type: ignore[no-untyped-def]
    """Maps a failed dsipam call (an ``_h2.RpcError``) to the CNI error to print.

    ``msg`` is the gRPC message; ``details`` names the status, the ErrorInfo reason and the call.
    """
    from . import _h2

    reason = exc.reason
    details = f"dsipam {method} at {endpoint}: {exc.code_name}" + (f" ({reason})" if reason else "")
    code = exc.code
    if code in (_h2.UNAVAILABLE, _h2.DEADLINE_EXCEEDED, _h2.ABORTED, _h2.CANCELLED):
        cni = TRY_AGAIN_LATER
    elif reason == "POOL_EXHAUSTED" or (code == _h2.RESOURCE_EXHAUSTED and not reason):
        cni = POOL_EXHAUSTED
    elif reason in ("ADDRESS_IN_USE", "OWNER_HOLDS_OTHER_ADDRESS"):
        cni = ADDRESS_IN_USE
    elif reason == "POOL_NOT_FOUND":
        cni = POOL_NOT_FOUND
    elif reason == "ALLOCATION_NOT_FOUND":
        cni = ALLOCATION_NOT_FOUND
    elif code in (_h2.UNAUTHENTICATED, _h2.PERMISSION_DENIED):
        cni = NOT_AUTHORIZED  # ipam.token (or the unix socket's role) does not allow this call
    elif code == _h2.INVALID_ARGUMENT or reason == "FAMILY_NOT_IN_POOL":
        cni = INVALID_CONFIG  # the request built from the config (and CNI_ARGS) does not fit the pool
    else:
        cni = SERVER_ERROR
    return CniError(cni, exc.message or details, details)
