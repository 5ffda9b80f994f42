"""Answers the network shells build themselves (format error, system error,
unsupported request), without the transaction pipeline."""

from __future__ import annotations

from typing import Iterable

from cardswitch.iso8583.constants import ECHOED_FIELDS, F, response_mti
from cardswitch.iso8583.dialect import Message


def is_request_mti(mti: str | None) -> bool:
    """A 4-digit MTI whose function digit names a request, advice or notification."""
    return mti is not None and len(mti) == 4 and mti.isdigit() and mti[2] in "02468"


def error_response(request: Message, code: str, also: Iterable[str] = ()) -> Message | None:
    """MTI+10 with field 39 = ``code``, echoing what wire.md 4 echoes of ``request``
    (plus the fields in ``also``).

    None when the request's MTI is not one that can be answered (not 4 digits,
    or already a response).
    """
    mti = request.get(F.MTI)
    if not is_request_mti(mti):
        return None
    resp: Message = {F.MTI: response_mti(mti)}  # type: ignore[arg-type]
    for k in ECHOED_FIELDS:
        v = request.get(k)
        if v is not None:
            resp[k] = v
    for k in also:
        v = request.get(k)
        if v is not None:
            resp[k] = v
    resp[F.RESPONSE_CODE] = code
    return resp
