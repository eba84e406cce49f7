"""The one naming rule for models, servers, routers and control-plane replicas.

Names travel in requests, etcd keys, metric labels and log lines, so they are kept boring:
letters, digits and `._-`, starting with a letter or digit, at most 128 characters. That rules
out `..`, spaces, `/` (a key separator) and anything a terminal or a Prometheus label would
mangle. `@` separates a model name from a version: a deployment is `NAME` or `NAME@VERSION`
(`smollm2@v2`), and clients ask for the name (an alias, see docs/architecture.md "Traffic
policy") or pin a version. No other kind of name may contain `@`.

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
#: Separates a model name from a version: `NAME@VERSION`.
VERSION_SEPARATOR = "@"
MAX_VERSION_CHARS = 64
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

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


def split_version(name: str) -> tuple[str, str]:
    """'smollm2@v2' -> ('smollm2', 'v2'); 'smollm2' -> ('smollm2', '')."""
    base, _, version = name.partition(VERSION_SEPARATOR)
    return base, version


def is_valid_model(name: str) -> bool:
    """A deployment name: NAME or NAME@VERSION."""
    if not isinstance(name, str):
        return False
    base, sep, version = name.partition(VERSION_SEPARATOR)
    return is_valid(base) and (not sep or VERSION_RE.fullmatch(version) is not None)


def check_model_name(name: str) -> str:
    """A deployment name, NAME or NAME@VERSION, else InvalidArgument naming the rule broken."""
    if is_valid_model(name):
        return name
    base, sep, version = (name or "").partition(VERSION_SEPARATOR)
    if not sep:
        return check_name("model name", name)
    check_name("model name", base)
    raise InvalidArgument(f"model version {_show(version)} in {_show(name)} is not valid: a version "
                          f"is 1-{MAX_VERSION_CHARS} characters from letters, digits, '.', '_' and "
                          "'-', starting with a letter or digit (one '@' only)")


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
