"""The one naming rule for models, servers, routers and control-plane replicas.

Names travel in requests, etcd keys, metric labels and log lines, so they are kept boring:
letters, digits and `._-`, starting with a letter or digit, at most 128 characters. That rules
out `..`, spaces, `/` (a key separator) and anything a terminal or a Prometheus label would
mangle. `@` is reserved: a model may later be addressed as `NAME@VERSION`, so no name may
contain it today.

Everything here raises `InvalidArgument` (a ValueError) naming the field and the rule.
"""

from __future__ import annotations

import re

from .errors import InvalidArgument

MAX_NAME_CHARS = 128
#: What every name looks like; the first character is a letter or digit.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RULE = (f"1-{MAX_NAME_CHARS} characters from letters, digits, '.', '_' and '-' (no '/', spaces "
        "or '@'), starting with a letter or digit")
#: Separates a model name from a version in a future `NAME@VERSION` reference.
VERSION_SEPARATOR = "@"

MAX_LABEL_CHARS = 63
LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")


def is_valid(name: str) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def _show(name: str) -> str:
    """The name as it appears in an error: quoted, escaped, and cut if huge."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def check_name(kind: str, name: str) -> str:
    """`name` if it follows the rule, else InvalidArgument saying which rule it breaks."""
    if is_valid(name):
        return name
    if not name:
        raise InvalidArgument(f"{kind} is required ({RULE})")
    if VERSION_SEPARATOR in name:
        raise InvalidArgument(f"{kind} {_show(name)} contains '{VERSION_SEPARATOR}', which is "
                              f"reserved for NAME{VERSION_SEPARATOR}VERSION; a name is {RULE}")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{kind} is {len(name)} characters long; a name is {RULE}")
    raise InvalidArgument(f"{kind} {_show(name)} is not a valid name: a name is {RULE}")


def check_model_name(name: str) -> str:
    return check_name("model name", name)


def check_server_id(server_id: str) -> str:
    return check_name("server id", server_id)


def check_replica_id(kind: str, replica_id: str) -> str:
    """Router and control-plane replica ids follow the same rule as server ids."""
    return check_name(f"{kind} id", replica_id)


def check_label(key: str, value: str) -> tuple[str, str]:
    """A server label (`--label zone-class=fast`): key a name of at most 63 characters, value
    empty or the same shape, so labels are safe in filters, tables and metric labels."""
    if not LABEL_RE.fullmatch(key or ""):
        raise InvalidArgument(f"label key {_show(key)} must be 1-{MAX_LABEL_CHARS} letters, digits, "
                              "'.', '_' or '-', starting and ending with a letter or digit")
    if value and not LABEL_RE.fullmatch(value):
        raise InvalidArgument(f"label {key}: value {_show(value)} must be empty or 1-{MAX_LABEL_CHARS} "
                              "letters, digits, '.', '_' or '-', starting and ending with a letter "
                              "or digit")
    return key, value
