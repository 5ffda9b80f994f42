"""ISO 8583 for cardswitch: dialects, framing, field helpers and constants.

Never imported as bare ``iso8583``: that name is pyiso8583's.
"""
